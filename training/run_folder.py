"""Reading a run folder while or after its child runs: progress.jsonl, the log tail, the end line, JSON files.

Standard library only: the app reads run folders through training.runner.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

LOG_TAIL_LINES = 30
PROGRESS_CACHE_FILES = 16  # progress files whose parsed lines are kept, so a second read parses only new lines
_PROGRESS: dict[str, tuple[int, int, list[dict]]] = {}  # path: (inode, bytes parsed, events)
_PROGRESS_LOCK = threading.Lock()


def read_progress(run_dir: str | Path) -> list[dict]:
    """All complete JSON lines of a run's progress file (a half-written last line is skipped).

    The Train tab asks every second while a run may have written thousands of lines: only the bytes added since the
    last read of the same file are read and parsed (a file that shrank or was replaced is read again whole)."""
    path = Path(run_dir) / "progress.jsonl"
    try:
        with path.open("rb") as handle:
            stat = os.fstat(handle.fileno())
            with _PROGRESS_LOCK:
                known = _PROGRESS.pop(str(path), None)
                if known is None or known[0] != stat.st_ino or stat.st_size < known[1]:
                    known = (stat.st_ino, 0, [])
                inode, offset, events = known
                handle.seek(offset)
                data = handle.read()
                complete = data.rfind(b"\n") + 1  # the rest may be a line still being written
                events = events + _parse_lines(data[:complete])
                _PROGRESS[str(path)] = (inode, offset + complete, events)
                while len(_PROGRESS) > PROGRESS_CACHE_FILES:
                    _PROGRESS.pop(next(iter(_PROGRESS)))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    return events + _parse_lines(data[complete:])  # a last line without its newline counts if it is whole JSON


def _parse_lines(data: bytes) -> list[dict]:
    events = []
    for line in data.decode("utf-8", errors="replace").split("\n"):  # not splitlines(): it also splits at U+2028,
        # U+2029 and U+0085, which JSON keeps raw inside strings (e.g. a generated sample in the end line's metrics)
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def end_event(run_dir: str | None) -> dict | None:
    """The run's last `end` line, or None while it runs (or when it died without one)."""
    ends = [e for e in read_progress(run_dir or ".") if e.get("event") == "end"]
    return ends[-1] if ends else None


def finished_run(run_dir: str | Path | None) -> str | None:
    """What marks `run_dir` as a run that ended (its end line, an adapter, a reward model), or None: a new run must
    not write there (it would overwrite a registered version's adapter and append to its progress)."""
    if not run_dir or not Path(run_dir).is_dir():
        return None
    if end_event(run_dir) is not None:
        return "the end line of a run in its progress.jsonl"
    for name in ("adapter", "reward_model"):
        if (Path(run_dir) / name).exists():
            return f"a trained {name}/"
    return None


def log_tail(run_dir: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of the run's log, read from the end of the file (logs grow to many megabytes)."""
    path = Path(run_dir) / "log.txt"
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            chunk = 64 * 1024
            while True:
                start = max(0, size - chunk)
                handle.seek(start)
                data = handle.read(size - start)
                if start == 0 or data.count(b"\n") > lines:
                    break
                chunk *= 4
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ""
    text = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join((text if start == 0 else text[1:])[-lines:])  # from the middle: the first line is cut


def read_json(path: Path):
    """The parsed file, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def optimizer_steps(metrics: dict) -> int:
    """The optimizer steps a run's metrics report ("steps"; PPO: "updates"); 0 when they report none."""
    try:
        return int(metrics.get("steps") or metrics.get("updates") or 0)
    except (TypeError, ValueError):
        return 0

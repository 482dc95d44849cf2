"""Reading a run folder while or after its child runs: progress.jsonl, the log tail, the end line, JSON files.

Standard library only: the app reads run folders through training.runner.
"""

from __future__ import annotations

import json
from pathlib import Path

LOG_TAIL_LINES = 30


def read_progress(run_dir: str | Path) -> list[dict]:
    """All complete JSON lines of a run's progress file (a half-written last line is skipped)."""
    path = Path(run_dir) / "progress.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def end_event(run_dir: str | None) -> dict | None:
    """The run's last `end` line, or None while it runs (or when it died without one)."""
    ends = [e for e in read_progress(run_dir or ".") if e.get("event") == "end"]
    return ends[-1] if ends else None


def log_tail(run_dir: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    path = Path(run_dir) / "log.txt"
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def read_json(path: Path):
    """The parsed file, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None

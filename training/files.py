"""Files the runner and the training child write: JSON-safe values, whole-file replacement, JSON and JSON lines.

Standard library only: the app imports this module through training.runner.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (JSON has no NaN), tensors and numpy scalars become numbers."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temp path next to `path` to write to: renamed over `path` on success, deleted on failure.

    A reader never sees half a file, and a failed write leaves no partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """`data` (made JSON-safe) as indented JSON, replacing the file whole."""
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, ensure_ascii=False))


def write_jsonl(path: str | Path, rows: Iterable[dict], *, append: bool = False) -> None:
    """One JSON object per line (UTF-8; values JSON cannot hold are written as text).

    append=False: the whole file, replaced through a temp file (see `replacing`).
    append=True: the lines are added at the end, flushed and fsynced before this returns, so a reader polling the
    file (the runner reading progress.jsonl) sees every reported line, and a crash loses none of them.
    """
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    if not append:
        write_text_atomic(path, text)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())

"""Training rows: reading a snapshot file (.jsonl / .json / .parquet) and the held-out split every method uses."""

from __future__ import annotations

import json
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """The data file is unreadable or has the wrong shape; str() names the file (and line)."""


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json (a list of objects) / .parquet file. DataError names the file and line."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    elif path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    else:
        raise DataError(f"{path}: unknown data file type (use {', '.join(DATA_SUFFIXES)})")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a list of objects (one row each)")
    if not rows:
        raise DataError(f"{path}: holds no rows")
    return rows


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) with a seeded shuffle; eval is empty when the fraction is 0 or leaves it under one row."""
    import random

    n_eval = int(len(rows) * eval_fraction)
    if n_eval < 1:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]

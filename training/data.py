"""Training rows: reading a snapshot file (.jsonl / .json / .parquet) and the held-out split every method uses."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
MIN_ROWS_FOR_EVAL = 4  # below this every row is needed for training


class DataError(ValueError):
    """The data file is unreadable or has the wrong shape; str() names the file (and line)."""


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json (a list of objects) / .parquet file. DataError names the file and line."""
    path = Path(path)
    suffix = path.suffix.lower()  # export accepts OUT.JSONL, so training reads it too
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    elif suffix == ".jsonl":
        rows = []
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 may sit inside a string
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
    elif suffix == ".json":
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


def eval_count(n_rows: int, eval_fraction: float) -> int:
    """How many of `n_rows` rows are held out for evaluation: the one rule of every method.

    Rounding rule: n × fraction rounded to the nearest whole row, halves up (10 % of 15 rows = 1.5 → 2; the product is
    first rounded to 9 decimals, so 70 % of 45 = 31.499999999999996 in floats still counts as 31.5 → 32), then kept
    between 1 (any fraction above 0 holds out a row) and n - 1 (a row is always left to train on).
    Nothing is held out with a fraction of 0 or fewer than MIN_ROWS_FOR_EVAL rows (every row is needed to train).
    """
    if eval_fraction <= 0 or n_rows < MIN_ROWS_FOR_EVAL:
        return 0
    return min(n_rows - 1, max(1, math.floor(round(n_rows * eval_fraction, 9) + 0.5)))


def split_rows(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): `eval_count` rows held out, whole prompts at a time, picked by a shuffle seeded with `seed`;
    both keep the input order. Rows of one prompt share answers (an edit is chosen over each original; several
    votes on one prompt): one of them in training and another held out made the held-out figures too good. A prompt
    whose rows would leave nothing to train on stays in training; rows without a prompt are their own group."""
    n_eval = eval_count(len(rows), eval_fraction)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        key = json.dumps(row["prompt"], sort_keys=True) if isinstance(row, dict) and "prompt" in row else f"#{i}"
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)  # one row per prompt: the same pick as shuffling the rows themselves
    held: set[int] = set()
    for members in order:
        if len(held) >= n_eval:
            break
        if len(held) + len(members) < len(rows):
            held.update(members)
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]

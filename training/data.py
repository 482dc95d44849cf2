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


def _style(value) -> str:
    """'text', 'chat' (a list of {role, content} messages) or 'other'."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return "chat"
    return "other"


def check_styles(rows: list[dict], keys: tuple[str, ...], path: str) -> None:
    """Every row gives all of `keys` as plain text or all as chat-message lists, and all rows the same way (TRL
    joins prompt and answer: a chat prompt with a text answer is a TypeError deep inside it). DataError names the
    row."""
    first: tuple[int, str] | None = None
    for number, row in enumerate(rows, start=1):
        styles = {key: _style(row[key]) for key in keys}
        if bad := [key for key, style in styles.items() if style == "other"]:
            raise DataError(
                f"{path}, row {number}: {', '.join(bad)} must be text or a list of chat messages (role, content)"
            )
        if len(set(styles.values())) > 1:
            text = ", ".join(key for key, style in styles.items() if style == "text")
            raise DataError(
                f"{path}, row {number}: mixes plain text ({text}) with chat messages "
                f"({', '.join(key for key, style in styles.items() if style == 'chat')}); give {', '.join(keys)} "
                "all as text or all as chat messages"
            )
        style = styles[keys[0]]
        if first is None:
            first = (number, style)
        elif style != first[1]:
            raise DataError(
                f"{path}, row {number}: {style} where row {first[0]} is {first[1]}; rows mix plain-text and "
                "chat-message rows: export them in one style"
            )


def kept_rows(trainer, n_train: int, n_eval: int, max_length: int, path: str) -> dict:
    """{"train_rows", "eval_rows", "dropped_rows"}: the rows a TRL trainer kept. DPO, KTO and SFT drop a row whose
    prompt alone has max_length tokens or more (it would train on no answer token); DataError when no training row
    is left. A held-out split left empty is not evaluated."""
    used = len(trainer.train_dataset)
    used_eval = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    dropped = n_train - used + n_eval - used_eval
    if not used:
        raise DataError(
            f"{path}: all {n_train} training rows have a prompt of max_length ({max_length}) tokens or more, so "
            "none has an answer token left to train on; raise --max-length or use shorter prompts"
        )
    if dropped:
        print(f"note: {dropped} rows dropped: their prompt alone has max_length ({max_length}) tokens or more")
    if trainer.eval_dataset is not None and not used_eval:
        from transformers.trainer_utils import IntervalStrategy

        trainer.eval_dataset = None
        trainer.args.eval_strategy = IntervalStrategy.NO
    return {"train_rows": used, "eval_rows": used_eval, "dropped_rows": dropped}


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
    """(train, eval): about `eval_count` rows held out, whole prompts at a time, picked by a shuffle seeded with
    `seed`; both keep the input order. Rows of one prompt share answers (an edit is chosen over each original;
    several votes on one prompt): one of them in training and another held out made the held-out figures too good.
    Rows without a prompt are their own group.

    Prompts are taken in shuffled order while they fit in the target; then, when it is not reached, the smallest
    prompt left is added if that brings the held-out count nearer the target (on a tie, when nothing is held out
    yet). So the held-out rows are as near the target as whole prompts allow and at most twice it, and a row is
    always left to train on. When a fraction above 0 ends with no row held out (or far from it), the log says so."""
    n_eval = eval_count(len(rows), eval_fraction)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        key = json.dumps(row["prompt"], sort_keys=True) if isinstance(row, dict) and "prompt" in row else f"#{i}"
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)  # one row per prompt: the same pick as shuffling the rows themselves
    held: set[int] = set()
    left = []
    for members in order:
        if len(held) + len(members) <= n_eval and len(held) + len(members) < len(rows):
            held.update(members)
        else:
            left.append(members)
    fits = [members for members in left if len(held) + len(members) < len(rows)]
    if len(held) < n_eval and fits:
        smallest = min(fits, key=len)  # the first of the smallest, in shuffled order
        now, then = n_eval - len(held), abs(len(held) + len(smallest) - n_eval)
        if then < now or (then == now and not held):
            held.update(smallest)
    if eval_fraction > 0 and (len(held) != n_eval or not held):
        print(f"note: {split_note(len(rows), len(held), n_eval, eval_fraction)}", flush=True)
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def split_note(n_rows: int, held: int, target: int, eval_fraction: float) -> str:
    """Why the held-out split differs from eval_fraction × rows (for the log)."""
    if n_rows < MIN_ROWS_FOR_EVAL:
        return f"eval_fraction {eval_fraction:g}: nothing held out (fewer than {MIN_ROWS_FOR_EVAL} rows)"
    if not held:
        return (
            f"eval_fraction {eval_fraction:g}: nothing held out — {target} of {n_rows} rows was the target, but "
            "holding out any prompt's rows would leave no row to train on or overshoot it too far (rows of one "
            "prompt stay together)"
        )
    return f"eval_fraction {eval_fraction:g}: {held} of {n_rows} rows held out (target {target}; whole prompts only)"

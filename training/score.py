"""Score answers with a reward model: `python -m training score --reward-model DIR --data FILE --out FILE`.

Input rows (.jsonl / .json / .parquet) are either (prompt, answer) rows — prompt as text or a chat, answer as text
or a one-message list — or dpo/reward export rows (prompt, chosen, rejected), whose both answers are scored.
The output (.jsonl or .parquet, by extension) holds every input row unchanged plus "score", or "chosen_score" and
"rejected_score" (in parquet a column that mixes text and chats is written as chats: parquet needs one type).
Other columns (e.g. generation_id, read back by storage.scores) pass through. The file is written to a temp name
and renamed, so a failed run leaves no partial output. Exit codes: 0 done, 2 bad input.
Answers are tokenized exactly as the reward model was trained (training.reward.encode_answer).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from training.common import CommonConfig
from training.configparse import ConfigError, parse_config
from training.data import DataError, load_rows
from training.files import replacing, write_jsonl
from training.reward import as_answer, as_prompt, check_reward_model, encode_answer, use_distinct_pad_token

OUT_SUFFIXES = (".jsonl", ".parquet")
Chat = list[dict]


@dataclass
class ScoreConfig(CommonConfig):
    """Score (prompt, answer) rows, or the chosen and rejected answers of preference rows, with a reward model."""

    method_name: ClassVar[str] = "score"
    out: str = field(default="", metadata={"help": "output file (.jsonl or .parquet): the rows plus scores; required"})
    reward_model: str = field(default="", metadata={"help": "reward model folder (a reward run's reward_model/)"})
    batch_size: int = field(default=8, metadata={"help": "answers scored per forward pass"})
    max_length: int = field(default=512, metadata={"help": "max tokens of prompt + answer (cuts the prompt's start)"})

    def validate(self) -> None:
        super().validate()
        check_reward_model(self.reward_model)
        if Path(self.out).suffix not in OUT_SUFFIXES:
            raise ConfigError(f"out: {self.out}: the output file must end in {' or '.join(OUT_SUFFIXES)}")
        if Path(self.out).resolve() == Path(self.data).resolve():
            raise ConfigError("out: must differ from data (the input would be overwritten)")


class ScoringCancelled(RuntimeError):
    """The run was cancelled while it scored (a reward run scores up to 100,000 stored answers)."""


class RewardScorer:
    """A saved reward model on the serving device; `score` returns one float per (prompt, answer)."""

    def __init__(self, model_dir: str | Path, max_length: int = 512, batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from models.device import pick_placement

        placement = pick_placement()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=placement.dtype)
        if self.model.config.pad_token_id is None:
            use_distinct_pad_token(self.tokenizer)
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = int(self.model.config.pad_token_id)
        self.model.to(placement.device).eval()
        self.device = placement.device
        self.max_length = max_length
        self.batch_size = batch_size
        self._torch = torch

    def score(self, items: list[tuple[Chat, Chat]], cancel=None, on_batch=None) -> list[float]:
        """Scores of (prompt chat, one-message answer) items, in input order; longest first to pad little.
        `cancel` (a threading.Event): once set, ScoringCancelled at the next batch; `on_batch(done, total)` after
        each batch."""
        torch = self._torch
        encoded = [encode_answer(self.tokenizer, prompt, answer, self.max_length) for prompt, answer in items]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            if cancel is not None and cancel.is_set():
                raise ScoringCancelled(f"cancelled after {start} of {len(order)} answers")
            chunk = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # right padding: the head reads the rightmost non-pad token
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(chunk):
                scores[i] = float(logits[row, 0])
            if on_batch is not None:
                on_batch(start + len(chunk), len(order))
        return scores


def _items(rows: list[dict], path: str) -> tuple[list[tuple[Chat, Chat]], list[tuple[int, str]]]:
    """All answers to score and, for each, (row index, output column)."""
    items, targets = [], []
    for index, row in enumerate(rows):
        where = f"{path}, row {index + 1}"
        if row.get("prompt") in (None, "", []):
            raise DataError(f"{where}: missing prompt")
        prompt = as_prompt(row["prompt"], where)
        if row.get("chosen") is not None and row.get("rejected") is not None:
            columns = (("chosen", "chosen_score"), ("rejected", "rejected_score"))
        elif row.get("answer") is not None:
            columns = (("answer", "score"),)
        else:
            raise DataError(f"{where}: needs an answer, or chosen and rejected (got keys {', '.join(row)})")
        for source, column in columns:
            items.append((prompt, as_answer(row[source], where)))
            targets.append((index, column))
    return items, targets


def score_rows(
    rows: list[dict],
    reward_model: str | Path,
    path: str = "rows",
    max_length: int = 512,
    batch_size: int = 8,
    cancel=None,
    on_batch=None,
) -> list[dict]:
    """Copies of `rows` with score columns added (DataError on a bad row, before any model is loaded).
    `on_batch(done, total)` is called after each batch of answers."""
    return _score(rows, reward_model, path, max_length, batch_size, cancel, on_batch)[0]


def _score(rows, reward_model, path, max_length, batch_size, cancel=None, on_batch=None):
    """(scored rows, the scores this call computed): a passed-through "score" column (null, or another model's)
    is not one of them."""
    items, targets = _items(rows, path)
    scores = RewardScorer(reward_model, max_length, batch_size).score(items, cancel, on_batch)
    scored = [dict(row) for row in rows]
    for (index, column), value in zip(targets, scores, strict=True):
        scored[index][column] = value
    return scored, scores


def _uniform_chats(rows: list[dict]) -> list[dict]:
    """Parquet columns hold one type: a column mixing text and chats is written as chats throughout."""
    convert = {"prompt": as_prompt, "answer": as_answer, "chosen": as_answer, "rejected": as_answer}
    mixed = [key for key in convert if len({isinstance(r.get(key), str) for r in rows if r.get(key) is not None}) > 1]
    if not mixed:
        return rows
    return [{**row, **{k: convert[k](row[k], k) for k in mixed if row.get(k) is not None}} for row in rows]


def write_rows(rows: list[dict], out: str | Path) -> None:
    """Rows to .jsonl or .parquet through a temp file and a rename (no partial file on failure). In parquet every
    row's columns are kept: a column some rows lack is null in those."""
    if Path(out).suffix != ".parquet":
        write_jsonl(out, rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys, first seen first
    full = [{key: row.get(key) for key in columns} for row in rows]  # from_pylist takes the first row's keys only
    with replacing(out) as tmp:
        pq.write_table(pa.Table.from_pylist(_uniform_chats(full)), tmp)


def main(argv: list[str] | None = None) -> int:
    """Parse, score, write. 0 on success; 2 with one `error:` line on bad arguments or data."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(ScoreConfig, argv)
        rows = load_rows(cfg.data)
        scored, values = _score(rows, cfg.reward_model, cfg.data, cfg.max_length, cfg.batch_size)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_rows(scored, cfg.out)
    print(f"scored {len(values)} answers in {len(scored)} rows → {cfg.out} (mean {sum(values) / len(values):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

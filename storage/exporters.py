"""Export judgements as training data: TRL-ready dpo / reward / kto / sft rows, or every comparison raw.

dpo, reward, kto and sft use only the *effective* comparisons (not superseded, choice A / B / tie / both_bad).
Prompts are chat message lists and answers one-message assistant lists (TRL's conversational format), so a
`dpo` file trains with `trl.DPOTrainer` as is. Rows come in comparison-id order, so an export is deterministic.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMATS = ("dpo", "reward", "kto", "sft", "raw")
EXTENSIONS = (".jsonl", ".parquet")
RAW_COLUMNS = ("id", "pair_id", "prompt_id", "generation_a", "generation_b", "annotator", "choice", "rationale",
               "edited_answer", "time_spent_s", "source", "supersedes", "dedupe_key", "created_at")  # fmt: skip


def export_rows(store, fmt: str, with_ids: bool = False) -> list[dict]:
    """The rows of one export format. with_ids adds each row's `comparison_id` (training lineage)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "raw":
        return _raw_rows(store)
    make = {"dpo": _pair_rows, "reward": _pair_rows, "kto": _kto_rows, "sft": _sft_rows}[fmt]
    rows = []
    for judgement in _effective(store):
        for row in make(judgement):
            rows.append({**row, "comparison_id": judgement["id"]} if with_ids else row)
    return rows


def export(store, fmt: str, out: str | Path) -> int:
    """Write one export to `out` (.jsonl or .parquet) via a temp file and a rename; returns the rows written."""
    out = Path(out)
    if out.suffix.lower() not in EXTENSIONS:
        raise ValueError(f"cannot export to {out.name!r}: the file name must end in {' or '.join(EXTENSIONS)}")
    rows = export_rows(store, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(handle)
    try:
        if out.suffix.lower() == ".jsonl":
            _write_jsonl(rows, Path(temp))
        else:
            _write_parquet(rows, fmt, Path(temp))
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return len(rows)


def push_to_hub(store, fmt: str, repo: str) -> int:
    """Upload one export as a Hugging Face dataset (needs network and a token); returns the rows pushed."""
    from datasets import Dataset

    rows = export_rows(store, fmt)
    Dataset.from_list(rows).push_to_hub(repo)
    return len(rows)


# ---- reading the store ------------------------------------------------------------------------------------
def _effective(store) -> list[dict]:
    with store.read() as cur:
        rows = cur.execute(
            "SELECT c.id, p.messages, ga.text, gb.text, c.choice, c.edited_answer FROM effective_comparisons c "
            "JOIN prompts p ON p.id = c.prompt_id JOIN generations ga ON ga.id = c.generation_a "
            "JOIN generations gb ON gb.id = c.generation_b ORDER BY c.id"
        ).fetchall()
    return [
        {"id": int(cid), "prompt": json.loads(messages), "a": a, "b": b, "choice": choice, "edited": _edit(edited)}
        for cid, messages, a, b, choice, edited in rows
    ]


def _raw_rows(store) -> list[dict]:
    columns = ", ".join(f"c.{name}" for name in RAW_COLUMNS)
    with store.read() as cur:
        cur.execute(
            f"SELECT {columns}, p.messages AS prompt, ga.text AS answer_a, gb.text AS answer_b, "
            "coalesce(ga.model_name, 'v' || ga.model_version_id::VARCHAR) AS model_a, "
            "coalesce(gb.model_name, 'v' || gb.model_version_id::VARCHAR) AS model_b, "
            "coalesce(ga.params->>'finish_reason' = 'length', false) AS truncated_a, "  # cut at the token limit
            "coalesce(gb.params->>'finish_reason' = 'length', false) AS truncated_b "
            "FROM comparisons c LEFT JOIN prompts p ON p.id = c.prompt_id "
            "LEFT JOIN generations ga ON ga.id = c.generation_a LEFT JOIN generations gb ON gb.id = c.generation_b "
            "ORDER BY c.id"
        )
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, values, strict=True)) for values in cur.fetchall()]
    for row in rows:
        row["prompt"] = json.loads(row["prompt"]) if row["prompt"] else None
        row["created_at"] = row["created_at"].isoformat() if row["created_at"] else None
    return rows


def _edit(text: str | None) -> str | None:
    return text if text and text.strip() else None


# ---- one judgement to rows -----------------------------------------------------------------------------------
def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _winner_loser(j: dict) -> tuple[str, str] | None:
    return {"A": (j["a"], j["b"]), "B": (j["b"], j["a"])}.get(j["choice"])


def _pair_rows(j: dict) -> list[dict]:
    """dpo/reward: the clear winner over the loser; an edited answer over each original it differs from."""
    pairs = []
    if (clear := _winner_loser(j)) is not None and clear[0] != clear[1]:
        pairs.append(clear)
    if j["edited"] is not None:
        pairs += [(j["edited"], original) for original in dict.fromkeys((j["a"], j["b"])) if original != j["edited"]]
    return [{"prompt": j["prompt"], "chosen": _reply(good), "rejected": _reply(bad)} for good, bad in pairs]


def _kto_rows(j: dict) -> list[dict]:
    """kto: winner desirable, loser undesirable; both-bad gives two undesirable rows; a tie says nothing.

    An edited answer is desirable and, being preferred over both originals, makes them both undesirable.
    """
    if j["edited"] is not None:
        labelled = [(j["edited"], True)] + [(text, False) for text in dict.fromkeys((j["a"], j["b"]))]
    elif (clear := _winner_loser(j)) is not None:
        labelled = [(clear[0], True), (clear[1], False)]
    elif j["choice"] == "both_bad":
        labelled = [(j["a"], False), (j["b"], False)]
    else:
        labelled = []
    seen: dict[str, bool] = {}
    for text, label in labelled:
        seen.setdefault(text, label)  # an edit equal to an original stays desirable, once
    return [{"prompt": j["prompt"], "completion": _reply(text), "label": label} for text, label in seen.items()]


def _sft_rows(j: dict) -> list[dict]:
    """sft: the edited answer when there is one, else the clear winner."""
    best = j["edited"] if j["edited"] is not None else (_winner_loser(j) or (None,))[0]
    return [] if best is None else [{"prompt": j["prompt"], "completion": _reply(best)}]


# ---- writing -------------------------------------------------------------------------------------------------
def _write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_parquet(rows: list[dict], fmt: str, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=_schema(fmt)), path)


def _schema(fmt: str) -> Any:
    """Fixed column types, so an empty export or an all-null column still has them."""
    import pyarrow as pa

    chat = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    if fmt in ("dpo", "reward"):
        return pa.schema([("prompt", chat), ("chosen", chat), ("rejected", chat)])
    if fmt == "kto":
        return pa.schema([("prompt", chat), ("completion", chat), ("label", pa.bool_())])
    if fmt == "sft":
        return pa.schema([("prompt", chat), ("completion", chat)])
    ints = ("id", "pair_id", "prompt_id", "generation_a", "generation_b", "supersedes")
    floats = ("time_spent_s",)
    fields = [(name, pa.int64() if name in ints else pa.float64() if name in floats else pa.string())
              for name in RAW_COLUMNS]  # fmt: skip
    texts = ("answer_a", "answer_b", "model_a", "model_b")
    flags = [(name, pa.bool_()) for name in ("truncated_a", "truncated_b")]
    return pa.schema([*fields, ("prompt", chat), *[(name, pa.string()) for name in texts], *flags])

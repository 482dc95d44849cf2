"""Export judgements as training data: TRL-ready dpo / reward / kto / sft rows, or every comparison raw.

dpo, reward, kto and sft use only the *effective* comparisons (not superseded, choice A / B / tie / both_bad).
Answers are compared without surrounding whitespace (what str.strip() removes): an edit equal to an original is no
edit, and two answers that differ only there are one answer (no pair of them, no pair repeated).
Prompts are chat message lists and answers one-message assistant lists (TRL's conversational format), so a
`dpo` file trains with `trl.DPOTrainer` as is. Rows come in comparison-id order, so an export is deterministic.
A dpo / reward file is built and written by DuckDB (PAIR_ROWS, the same rows as `_pair_rows`), a chunk of
comparisons at a time, so a million judgements never become Python objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from storage.db import COMPARISON_COLUMNS
from storage.ratings import MODEL_SQL

FORMATS = ("dpo", "reward", "kto", "sft", "raw")
EXTENSIONS = (".jsonl", ".parquet")
RAW_COLUMNS = ("id", *COMPARISON_COLUMNS, "created_at")


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
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.{uuid.uuid4().hex}.part"
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0666 less the umask, as open() makes
    try:
        if fmt in ("dpo", "reward"):  # the big ones: built and written by DuckDB, never as Python objects
            count = _write_pairs(store, fmt, temp, out.suffix.lower())
        else:
            rows = export_rows(store, fmt)
            if out.suffix.lower() == ".jsonl":
                _write_jsonl(rows, temp)
            else:
                _write_parquet(rows, fmt, temp)
            count = len(rows)
        os.replace(temp, out)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return count


def push_to_hub(store, fmt: str, repo: str) -> int:
    """Upload one export as a Hugging Face dataset (needs network and a token); returns the rows pushed."""
    from datasets import Dataset

    rows = export_rows(store, fmt)
    Dataset.from_list(rows).push_to_hub(repo)
    return len(rows)


# ---- reading the store ------------------------------------------------------------------------------------


def ppo_prompt_rows(store) -> list[dict]:
    """PPO prompts: those with comparisons first, then the rest."""
    with store.read() as cur:
        cur.execute(
            "SELECT p.messages FROM prompts p LEFT JOIN (SELECT prompt_id, count(*) n FROM effective_comparisons "
            "GROUP BY prompt_id) c ON c.prompt_id = p.id ORDER BY coalesce(c.n, 0) DESC, p.id"
        )
        return [{"prompt": json.loads(m) if isinstance(m, str) else m} for (m,) in cur.fetchall()]


def _effective(store) -> list[dict]:
    with store.read() as cur:
        rows = cur.execute(
            "SELECT c.id, p.messages, ga.text, gb.text, c.choice, c.edited_answer FROM effective_comparisons c "
            "JOIN prompts p ON p.id = c.prompt_id JOIN generations ga ON ga.id = c.generation_a "
            "JOIN generations gb ON gb.id = c.generation_b ORDER BY c.id"
        ).fetchall()
    return [
        {"id": int(cid), "prompt": json.loads(messages), "a": a, "b": b, "choice": choice, "edited": _edit(edit, a, b)}
        for cid, messages, a, b, choice, edit in rows
    ]


def _raw_rows(store) -> list[dict]:
    columns = ", ".join(f"c.{name}" for name in RAW_COLUMNS)
    with store.read() as cur:
        cur.execute(
            f"SELECT {columns}, p.messages AS prompt, ga.text AS answer_a, gb.text AS answer_b, "
            f"{MODEL_SQL.format(g='ga')} AS model_a, {MODEL_SQL.format(g='gb')} AS model_b, "  # as the leaderboard
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


# _pair_rows in SQL, for the comparisons with ids in [$lo, $hi]: per effective comparison (in id order) the clear
# winner over the loser when their texts differ, then a non-blank edited answer that differs from both originals
# over answer A, then over answer B (B only when B != A); texts compared trimmed of $ws (str.strip()'s whitespace):
# {ga_text} etc. are those columns so (storage.tallies.stripped). {prompt} is the prompt column: JSON text, or
# structs for parquet.
PAIR_ROWS = """
SELECT id, k, prompt, good, bad FROM (
    SELECT c.id, 0 AS k, {prompt} AS prompt, CASE c.choice WHEN 'A' THEN ga.text ELSE gb.text END AS good,
           CASE c.choice WHEN 'A' THEN gb.text ELSE ga.text END AS bad
    {judged} AND c.choice IN ('A', 'B') AND {ga_text} <> {gb_text}
    UNION ALL
    SELECT id, k, prompt, good, bad FROM (
        SELECT c.id, {prompt} AS prompt, c.edited_answer AS edited, ga.text AS a, gb.text AS b
        {judged} AND c.edited_answer IS NOT NULL AND regexp_matches(c.edited_answer, $not_blank)
            AND {c_edited_answer} NOT IN ({ga_text}, {gb_text})) edits,
    LATERAL (SELECT 1 AS k, edited AS good, a AS bad
             UNION ALL SELECT 2, edited, b WHERE {b} <> {a}))"""
JUDGED = """FROM effective_comparisons c JOIN prompts p ON p.id = c.prompt_id
    JOIN generations ga ON ga.id = c.generation_a JOIN generations gb ON gb.id = c.generation_b
    WHERE c.id BETWEEN $lo AND $hi"""
JSON_LINE = """'{"prompt": ' || prompt || ', "chosen": [{"role": "assistant", "content": ' || to_json(good)
    || '}], "rejected": [{"role": "assistant", "content": ' || to_json(bad) || '}]}' || chr(10)"""  # the stored prompt
PARQUET_COLUMNS = (
    "prompt, [{'role': 'assistant', 'content': good}] AS chosen, [{'role': 'assistant', 'content': bad}] AS rejected"
)
PAIR_CHUNK = 50_000  # comparisons per query: sorting a few at a time is far cheaper than one sort of a million


def _write_pairs(store, fmt: str, path: Path, suffix: str) -> int:
    """dpo / reward rows (what _pair_rows makes) straight from DuckDB, PAIR_CHUNK comparisons per query: as JSON
    lines (DuckDB's to_json), or Arrow batches cast to the fixed parquet schema. Returns the rows written."""
    import pyarrow.parquet as pq

    from storage.tallies import NOT_BLANK, WHITESPACE, stripped

    jsonl, schema, count = suffix == ".jsonl", _schema(fmt), 0
    prompt = "p.messages::VARCHAR" if jsonl else "p.messages::JSON::STRUCT(role VARCHAR, content VARCHAR)[]"
    texts = {name.replace(".", "_"): stripped(name) for name in ("ga.text", "gb.text", "c.edited_answer", "a", "b")}
    rows = PAIR_ROWS.format(prompt=prompt, judged=JUDGED, **texts)
    sql = f"SELECT {JSON_LINE if jsonl else PARQUET_COLUMNS} FROM ({rows}) ORDER BY id, k"
    tables = ("prompts", "generations", "comparisons")  # on PostgreSQL, DuckDB writes it from a copy of these
    with store.analytics(tables) as cur, path.open("wb") if jsonl else pq.ParquetWriter(path, schema) as out:
        cur.execute("BEGIN TRANSACTION READ ONLY")  # every chunk sees the same moment
        starts = [
            row[0]
            for row in cur.execute(
                "SELECT id FROM comparisons QUALIFY (row_number() OVER (ORDER BY id) - 1) % ? = 0 ORDER BY id",
                [PAIR_CHUNK],
            ).fetchall()
        ]
        ends = [start - 1 for start in starts[1:]] + [2**63 - 1] * bool(starts)
        with _written_behind(out.write if jsonl else out.write_batch) as write:
            for lo, hi in zip(starts, ends, strict=True):
                params = {"not_blank": NOT_BLANK, "ws": WHITESPACE, "lo": lo, "hi": hi}
                for batch in cur.sql(sql, params=params).to_arrow_reader(50_000):
                    write(_joined(batch.column(0)) if jsonl else batch.cast(schema))
                    count += batch.num_rows
        cur.execute("ROLLBACK")
    return count


@contextlib.contextmanager
def _written_behind(write: Callable[[Any], Any]) -> Iterator[Callable[[Any], None]]:
    """A function that hands each item to `write` on a thread of its own, so the file's writes overlap DuckDB's next
    chunk (the 1M dpo export, 1.1 GB: 3.7-4.5 s -> 3.0 s; writing that much alone takes 3 s here). At most 4 items
    wait (memory stays bounded). A failed write (a full disk) is raised to the caller, at its next item or at the end;
    the caller's own failure stops the thread too."""
    pending: queue.Queue = queue.Queue(maxsize=4)
    failed: list[BaseException] = []

    def drain() -> None:
        while (item := pending.get()) is not None:
            if not failed:  # after a failure the rest are dropped, so the caller never blocks on a full queue
                try:
                    write(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    failed.append(exc)

    def put(item) -> None:
        if failed:
            raise failed[0]
        pending.put(item)

    thread = threading.Thread(target=drain, name="export-writer", daemon=True)
    thread.start()
    try:
        yield put
    finally:
        pending.put(None)
        thread.join()
    if failed:
        raise failed[0]


def _joined(lines) -> bytes | memoryview:
    """The strings of an Arrow string column back to back: its data buffer as it is (no copy) when it has one."""
    import pyarrow as pa

    if lines.null_count == 0 and (pa.types.is_string(lines.type) or pa.types.is_large_string(lines.type)):
        import numpy as np

        width = np.int64 if pa.types.is_large_string(lines.type) else np.int32
        offsets = np.frombuffer(lines.buffers()[1], dtype=width)[lines.offset : lines.offset + len(lines) + 1]
        return memoryview(lines.buffers()[2])[int(offsets[0]) : int(offsets[-1])] if len(lines) else b""
    return "".join(lines.to_pylist()).encode("utf-8")


def _edit(text: str | None, a: str, b: str) -> str | None:
    """The edited answer, or None when it is blank or the same as either original (surrounding whitespace aside)."""
    if not text or not text.strip() or text.strip() in (a.strip(), b.strip()):
        return None
    return text


def _distinct(*texts: str) -> list[str]:
    """The texts, each once: the first of those equal but for surrounding whitespace."""
    seen: dict[str, str] = {}
    for text in texts:
        seen.setdefault(text.strip(), text)
    return list(seen.values())


# ---- one judgement to rows -----------------------------------------------------------------------------------
def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _winner_loser(j: dict) -> tuple[str, str] | None:
    return {"A": (j["a"], j["b"]), "B": (j["b"], j["a"])}.get(j["choice"])


def _pair_rows(j: dict) -> list[dict]:
    """dpo/reward: the clear winner over the loser; an edited answer (never one equal to an original) over each
    distinct original."""
    pairs = []
    if (clear := _winner_loser(j)) is not None and clear[0].strip() != clear[1].strip():
        pairs.append(clear)
    if j["edited"] is not None:
        pairs += [(j["edited"], original) for original in _distinct(j["a"], j["b"])]
    return [{"prompt": j["prompt"], "chosen": _reply(good), "rejected": _reply(bad)} for good, bad in pairs]


def _kto_rows(j: dict) -> list[dict]:
    """kto: winner desirable, loser undesirable; both-bad gives two undesirable rows; a tie says nothing.

    An edited answer is desirable and, being preferred over both originals, makes them both undesirable.
    """
    if j["edited"] is not None:
        labelled = [(j["edited"], True)] + [(text, False) for text in _distinct(j["a"], j["b"])]
    elif (clear := _winner_loser(j)) is not None:
        labelled = [(clear[0], True), (clear[1], False)]
    elif j["choice"] == "both_bad":
        labelled = [(j["a"], False), (j["b"], False)]
    else:
        labelled = []
    seen: dict[str, tuple[str, bool]] = {}
    for text, label in labelled:
        seen.setdefault(text.strip(), (text, label))  # one answer, one label: the first (the winner's)
    return [{"prompt": j["prompt"], "completion": _reply(text), "label": label} for text, label in seen.values()]


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
    fields = [
        (name, pa.int64() if name in ints else pa.float64() if name in floats else pa.string()) for name in RAW_COLUMNS
    ]
    texts = ("answer_a", "answer_b", "model_a", "model_b")
    flags = [(name, pa.bool_()) for name in ("truncated_a", "truncated_b")]
    return pa.schema([*fields, ("prompt", chat), *[(name, pa.string()) for name in texts], *flags])

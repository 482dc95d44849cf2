"""Import prompt lists and preference datasets into the store: each file in one transaction, all or nothing.

A file is read into records (a text line, a CSV row, a JSON object, a parquet row), every record is validated
and turned into an `Item` (a prompt, and for preference data two answers and a choice) before anything is
written; then one transaction writes them all. Each imported comparison carries a `dedupe_key`, checked before
its generations are inserted, so importing the same file again adds nothing.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from storage.db import MAX_FIELD_CHARS, prompt_hash
from storage.errors import ImportFailed
from storage.import_bulk import bulk_import
from storage.import_checks import MAX_DEPTH, deep_line, too_deep
from storage.import_formats import FORMATS, PARSERS, PROMPT_FORMATS, Item, detect_format, require_object
from storage.migrations import dialect
from storage.rows import NOT_UNICODE, is_unicode

__all__ = ["FORMATS", "import_file", "read_records", "write_items"]

SUFFIXES = (".txt", ".csv", ".json", ".jsonl", ".parquet")
TOO_DEEP = f"is nested over {MAX_DEPTH} levels deep (lists and objects inside each other)"


# ---- the entry point ----------------------------------------------------------------------------------------
def import_file(store, path: str | Path, fmt: str = "auto", max_rows: int | None = None) -> dict:
    """Import one file; returns {"format", "prompts", "comparisons"} (rows newly written or already there).

    `max_rows` caps the rows of one file (browser uploads); the operator's `python -m storage import` has no cap.

    Raises ImportFailed (one line naming the file, the line or row, and the problem) with nothing written.
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ImportFailed(path, f"unknown format {fmt!r}; formats known: auto, {', '.join(FORMATS)}")
    done = bulk_import(store, path, fmt, max_rows)  # big trl / arena files, in bulk (storage/import_bulk.py)
    if done is not None:
        return done
    records = read_records(path, as_lines=fmt == "txt")
    if not records:
        raise ImportFailed(path, "no rows to import")
    if max_rows is not None and len(records) > max_rows:
        raise ImportFailed(
            path, f"{len(records):,} rows; an upload holds at most {max_rows:,} (use python -m storage import)"
        )
    for where, record in records:
        _check_sizes(path, where, record)
    if fmt == "auto":
        fmt = detect_format(path, records)
    parse = PARSERS[fmt]
    items = []
    for where, record in records:
        try:
            item = parse(record if fmt in PROMPT_FORMATS else require_object(record, fmt))
        except (ValueError, TypeError) as exc:
            raise ImportFailed(path, str(exc), where) from None
        item.where = where
        items.append(item)
    return write_items(store, path, items, fmt)


def write_items(store, path: Path, items: list[Item], fmt: str) -> dict:
    """The whole file in one transaction, in bulk: a few statements per file, not several per row.

    Row by row costs about 1 ms per statement here, and the transaction holds the store's write lock, so a
    large file written that way would stall labelling for minutes. Known dedupe keys (and repeats within the
    file) are dropped before any generation is inserted. Any failure rolls everything back.
    """
    source = f"import:{fmt}"
    pairs = [item for item in items if item.answers is not None]
    keys = [item.dedupe_key(fmt) for item in pairs]
    try:
        with store.transaction() as cur:
            prompt_ids = _store_prompts(cur, [item.prompt for item in items], source)
            seen = set(_existing(cur, "comparisons", "dedupe_key", "id", keys))
            new = []
            for item, key, prompt_id in zip(pairs, keys, _pair_prompt_ids(items, prompt_ids), strict=True):
                if key not in seen:
                    seen.add(key)
                    new.append((item, key, prompt_id))
            _store_comparisons(cur, new, source)
    except Exception as exc:  # the transaction was rolled back: nothing of this file is stored
        raise ImportFailed(path, f"could not be stored ({exc})") from None
    return {"format": fmt, "prompts": len(set(prompt_ids)), "comparisons": len(set(keys))}


def _pair_prompt_ids(items: list[Item], prompt_ids: list[int]) -> list[int]:
    return [pid for item, pid in zip(items, prompt_ids, strict=True) if item.answers is not None]


def _store_prompts(cur, prompts: list[list[dict]], source: str) -> list[int]:
    """The prompt id of each prompt (validated chats), inserting those not stored yet (by hash)."""
    hashes = [prompt_hash(messages) for messages in prompts]
    by_hash = dict(zip(hashes, prompts, strict=True))
    ids = _existing(cur, "prompts", "hash", "id", list(by_hash))
    missing = [digest for digest in by_hash if digest not in ids]
    if missing:
        new_ids = _next_ids(cur, "prompts_id_seq", len(missing))
        _insert(
            cur,
            "prompts",
            {
                "id": new_ids,
                "hash": missing,
                "source": [source] * len(missing),
                "messages": [json.dumps(by_hash[d], ensure_ascii=False) for d in missing],
                "text": [by_hash[d][-1]["content"] for d in missing],
            },
        )
        ids.update(zip(missing, new_ids, strict=True))
    return [ids[digest] for digest in hashes]


def _store_comparisons(cur, new: list[tuple[Item, str, int]], source: str) -> None:
    """Annotators, both generations of each pair (A then B), then the comparisons themselves."""
    if not new:
        return
    annotators = sorted({item.annotator for item, _, _ in new})
    _insert(cur, "annotators", {"name": annotators}, on_conflict="ON CONFLICT DO NOTHING")
    answers = [(prompt_id, answer) for item, _, prompt_id in new for answer in item.answers]
    generation_ids = _next_ids(cur, "generations_id_seq", len(answers))
    _insert(
        cur,
        "generations",
        {
            "id": generation_ids,
            "prompt_id": [prompt_id for prompt_id, _ in answers],
            "model_name": [answer.model_name for _, answer in answers],
            "text": [answer.text for _, answer in answers],
            "params": [json.dumps({"source": source, **answer.params}, ensure_ascii=False) for _, answer in answers],
        },
    )
    _insert(
        cur,
        "comparisons",
        {
            "id": _next_ids(cur, "comparisons_id_seq", len(new)),
            "prompt_id": [pid for _, _, pid in new],
            "generation_a": generation_ids[0::2],
            "generation_b": generation_ids[1::2],
            "annotator": [item.annotator for item, _, _ in new],
            "choice": [item.choice for item, _, _ in new],
            "source": [source] * len(new),
            "dedupe_key": [key for _, key, _ in new],
        },
    )


def _existing(cur, table: str, key_column: str, value_column: str, keys: list[str]) -> dict[str, Any]:
    """{key: value} for the keys already stored in table (one join, however many keys)."""
    if not keys:
        return {}
    import pyarrow as pa

    if dialect(cur) == "postgres":
        sql = f"SELECT {key_column}, {value_column} FROM {table} WHERE {key_column} = ANY(?::VARCHAR[])"
        return dict(cur.execute(sql, [keys]).fetchall())
    cur.register("import_keys", pa.table({"key": pa.array(keys, pa.string())}))  # dropped with the cursor on error
    sql = f"SELECT t.{key_column}, t.{value_column} FROM {table} t JOIN import_keys k ON k.key = t.{key_column}"
    found = dict(cur.execute(sql).fetchall())
    cur.unregister("import_keys")
    return found


def _next_ids(cur, sequence: str, count: int) -> list[int]:
    return [
        int(row[0])
        for row in cur.execute(f"SELECT nextval('{sequence}') FROM generate_series(1, ?)", [count]).fetchall()
    ]


def _insert(cur, table: str, columns: dict[str, list], on_conflict: str = "") -> None:
    """One INSERT ... SELECT of many rows from an Arrow table registered on the cursor."""
    import pyarrow as pa

    if dialect(cur) == "postgres":  # one multi-row INSERT per 1,000 rows (PostgreSQL cannot read an Arrow table)
        names, rows = list(columns), list(zip(*columns.values(), strict=True))
        for start in range(0, len(rows), 1000):
            chunk = rows[start : start + 1000]
            values = ", ".join(["(" + ", ".join(["?"] * len(names)) + ")"] * len(chunk))
            cur.execute(
                f"INSERT INTO {table} ({', '.join(names)}) VALUES {values} {on_conflict}",
                [v for row in chunk for v in row],
            )
        return
    cur.register("import_rows", pa.table(columns))  # on error the cursor (and this view) is dropped unused
    names = ", ".join(columns)
    cur.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM import_rows {on_conflict}")
    cur.unregister("import_rows")


# ---- reading files into (where, record) ---------------------------------------------------------------------
def read_records(path: Path, as_lines: bool = False) -> list[tuple[str, Any]]:
    """The file's records, each with where it is ("line 3", "row 3", "item 3"). Text must be UTF-8."""
    if not path.exists():
        raise ImportFailed(path, "no such file")
    if path.is_dir():
        raise ImportFailed(path, "is a directory, not a file")
    if not path.is_file():
        raise ImportFailed(path, "is not a file")
    suffix = path.suffix.lower()
    if not as_lines and suffix not in SUFFIXES:
        raise ImportFailed(path, f"unsupported file type {suffix or '(none)'!r}; use {', '.join(SUFFIXES)}")
    data = path.read_bytes()
    if not data.strip():
        raise ImportFailed(path, "the file is empty")
    if suffix == ".parquet" and not as_lines:
        return _parquet_records(path)
    text = _decode(path, data)
    if as_lines or suffix == ".txt":
        lines = enumerate(text.split("\n"), start=1)
        return [(f"line {n}", line.strip()) for n, line in lines if line.strip()]
    if suffix == ".csv":
        return _csv_records(path, text)
    if suffix == ".jsonl":
        return _jsonl_records(path, text)
    return _json_records(path, text)


def _decode(path: Path, data: bytes) -> str:
    bom = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as some editors write it
    start = len(bom) if data.startswith(bom) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data[:offset].count(b"\n") + 1
        raise ImportFailed(
            path, f"is not UTF-8 text (byte {offset} is 0x{data[offset]:02x}); save it as UTF-8", f"line {line}"
        ) from None


def _csv_records(path: Path, text: str) -> list[tuple[str, Any]]:
    old_limit = csv.field_size_limit(sys.maxsize)  # the default (128 KiB) is below our own per-field limit
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        records = []
        try:
            for row in reader:
                if None in row:  # values beyond the header's columns (a comma too many, a shifted row): not dropped
                    columns = len(reader.fieldnames)
                    problem = f"the row has {columns + len(row[None])} values but the header names {columns} columns"
                    raise ImportFailed(path, problem, f"line {reader.line_num}")
                records.append((f"line {reader.line_num}", row))
        except csv.Error as exc:
            raise ImportFailed(path, f"is not valid CSV ({exc})", f"line {reader.line_num}") from None
        return records
    finally:
        csv.field_size_limit(old_limit)


def _jsonl_records(path: Path, text: str) -> list[tuple[str, Any]]:
    records = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ImportFailed(path, f"is not valid JSON ({exc.msg} at column {exc.colno})", f"line {n}") from None
        except RecursionError:
            raise ImportFailed(path, TOO_DEEP, f"line {n}") from None
    return records


def _json_records(path: Path, text: str) -> list[tuple[str, Any]]:
    """A .json file: a JSON list of rows, or JSON Lines. A lone object is refused (one row? rows under a key?)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json (what datasets' to_json writes)
            return _jsonl_records(path, text)
        problem = f"is not valid JSON ({exc.msg} at column {exc.colno})"
        raise ImportFailed(path, problem, f"line {exc.lineno}") from None
    except RecursionError:
        line = deep_line(text.encode(), MAX_DEPTH + 1)  # + 1: the list that holds the rows
        raise ImportFailed(path, TOO_DEEP, f"line {line}" if line else None) from None
    if isinstance(data, dict):
        listed = next((f" (its {key!r} holds a list)" for key, value in data.items() if isinstance(value, list)), "")
        problem = f"holds one JSON object{listed}, not a list of rows: write the rows as a JSON list or JSON Lines"
        raise ImportFailed(path, problem)
    if not isinstance(data, list):
        raise ImportFailed(path, "must hold a JSON list of objects (or JSON Lines)")
    return [(f"item {n}", record) for n, record in enumerate(data, start=1)]


def _parquet_records(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ImportFailed(path, f"is not a readable parquet file ({exc})") from None
    return [(f"row {n}", row) for n, row in enumerate(rows, start=1)]


def _check_sizes(path: Path, where: str, record: Any) -> None:
    """Every text of the row: at most MAX_FIELD_CHARS, and one UTF-8 can hold (any field: names and models too); the
    row at most MAX_DEPTH levels deep (checked first, without recursion: the walks below and the parsers recurse)."""
    if isinstance(record, list) and too_deep(record):
        raise ImportFailed(path, TOO_DEEP, where)
    for key, value in record.items() if isinstance(record, dict) else ():
        if too_deep(value, MAX_DEPTH - 1):
            raise ImportFailed(path, f"field {key!r} {TOO_DEEP}", where)
    if isinstance(record, str):
        if len(record) > MAX_FIELD_CHARS:
            raise ImportFailed(path, f"the line is over {MAX_FIELD_CHARS:,} characters", where)
        if not is_unicode(record):
            raise ImportFailed(path, f"the line {NOT_UNICODE}", where)
        return
    for key, value in record.items() if isinstance(record, dict) else ():
        if _longest_text(value) > MAX_FIELD_CHARS:
            raise ImportFailed(path, f"field {key!r} is over {MAX_FIELD_CHARS:,} characters", where)
        if not all(is_unicode(text) for text in _texts(value)):
            raise ImportFailed(path, f"field {key!r} {NOT_UNICODE}", where)


def _texts(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _texts(item)


def _longest_text(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return max((_longest_text(v) for v in value), default=0)
    return 0

"""The bulk importer (storage/import_bulk.py) stores exactly what the row-by-row importer stores, or steps aside."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import import_bulk, importers
from storage.db import Store
from storage.errors import ImportFailed
from storage.importers import import_file

ODD = 'quote " backslash \\ tab\t nl\n cr\r vt\x0b esc\x1b nul\x00 del\x7f ls\u2028 é 中 🙂 nbsp\u00a0'


def chat(*turns: tuple[str, str], extra: bool = False) -> list[dict]:
    return [{"role": role, "content": text, **({"tokens": 3} if extra else {})} for role, text in turns]


def arena_rows() -> list[dict]:
    rows = []
    for i in range(40):
        history = [("system", f"Be brief {i % 3}.")] if i % 4 == 0 else []
        ask = ("user", f"Question {i % 7}: {ODD if i % 5 == 0 else 'plain'}?")
        a = chat(*history, ask, ("assistant", f"A{i} {ODD if i % 3 == 0 else ''}"), extra=i % 6 == 0)
        b = chat(*history, ask, ("assistant", f"B{i}"), extra=i % 6 == 0)
        if i % 8 == 1:  # multi-turn: the rest of each conversation is kept as the answer's continuation
            a += chat(("user", "And then?"), ("assistant", "Then more."), extra=i % 6 == 0)
        rows.append({
            "question_id": f"q{i}", "model_a": f" model-{i % 3} ", "model_b": "model-x",
            "winner": ["model_a", "model_b", "tie", "tie (bothbad)"][i % 4],
            "judge": [None, "", "  alice\u3000", "bob", "\u3000"][i % 5], "tstamp": 1_700_000_000.25 + i,
            "language": None if i % 2 else "English", "conversation_a": a, "conversation_b": b, "note": None,
        })  # fmt: skip
    rows.append(dict(rows[3]))  # the same judgement twice in one file: stored once
    return rows


def trl_rows(conversational: bool) -> list[dict]:
    rows = []
    for i in range(30):
        prompt, good, bad = f"Prompt {i % 9} {ODD if i % 4 == 0 else ''}", f"good {i} {ODD}", f"bad {i}"
        if conversational:
            rows.append({"prompt": chat(("user", prompt)), "chosen": chat(("assistant", good)),
                         "rejected": chat(("assistant", bad))})  # fmt: skip
        else:
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def write(path, rows: list[dict]) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def contents(store) -> dict:
    with store.read() as cur:

        def rows(sql):  # noqa: E306
            return cur.execute(sql).fetchall()

        return {
            "prompts": rows("SELECT id, hash, messages, text, source FROM prompts ORDER BY id"),
            "generations": rows(  # params as stored: the same text, not only the same JSON value
                "SELECT id, prompt_id, model_version_id, model_name, text, token_count, latency_ms, params "
                "FROM generations ORDER BY id"
            ),
            "comparisons": rows("SELECT * EXCLUDE (created_at) FROM comparisons ORDER BY id"),
            "annotators": rows("SELECT name FROM annotators ORDER BY name"),
        }


def counted(write, calls: list):
    def wrapper(*args):
        calls.append(1)
        return write(*args)

    return wrapper


def both_ways(tmp_path, monkeypatch, files: list) -> tuple[dict, dict, list, list]:
    """Import `files` into one store in bulk and into another row by row; (contents, contents, results, results)."""
    results = {}
    for way in ("bulk", "rows"):
        store = Store(tmp_path / f"{way}.duckdb")
        store.add_prompt("Question 1: plain?", "earlier")  # a prompt that is already there
        with monkeypatch.context() as patch:
            used = []
            patch.setattr(import_bulk, "_write", counted(import_bulk._write, used))
            if way == "rows":
                patch.setattr(importers, "bulk_import", lambda *a: None)
            summaries = [import_file(store, path, fmt) for path, fmt in files]
            results[way] = (contents(store), summaries, used)
        store.close()
    return results["bulk"][0], results["rows"][0], results["bulk"][1:], results["rows"][1]


@pytest.mark.parametrize("suffix, parts", [(".parquet", 1), (".parquet", 3), (".jsonl", 1)])
def test_bulk_and_row_by_row_store_the_same_rows(tmp_path, monkeypatch, suffix, parts):
    """parts 3: a parquet file staged in three row ranges on parallel cursors, as a big file is."""
    split = []
    monkeypatch.setattr(
        import_bulk,
        "_ranges",
        lambda cur, count: split.append(count)
        or [(count * i // parts, count * (i + 1) // parts) for i in range(parts)],
    )
    files = []
    for name, rows, fmt in (("arena", arena_rows(), "auto"), ("trl", trl_rows(False), "trl"),
                            ("chat", trl_rows(True), "auto")):  # fmt: skip
        path = tmp_path / f"{name}{suffix}"
        write(path, rows)
        files += [(path, fmt), (path, fmt)]  # the second import of a file adds nothing
    bulk, rows, (bulk_summaries, used), row_summaries = both_ways(tmp_path, monkeypatch, files)
    assert len(used) == len(files)  # every file went in bulk
    assert len(split) == (len(files) if suffix == ".parquet" else 0)
    assert bulk_summaries == row_summaries
    assert bulk == rows
    assert len(bulk["comparisons"]) == 40 + 30  # the chat file holds the trl file's judgements: stored once


def test_ranges_cover_every_row_once():
    store = Store(":memory:")
    with store.read() as cur:
        threads = int(cur.execute("SELECT current_setting('threads')").fetchone()[0])
        assert import_bulk._ranges(cur, import_bulk.RANGE_ROWS - 1) == [(0, import_bulk.RANGE_ROWS - 1)]
        ranges = import_bulk._ranges(cur, 100_003)
    store.close()
    assert len(ranges) == max(1, min(threads, 4))
    assert ranges[0][0] == 0 and ranges[-1][1] == 100_003
    assert all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False))


def test_a_file_the_row_importer_refuses_is_left_to_it(tmp_path, monkeypatch):
    rows = arena_rows()
    rows[17]["winner"] = "model_c"
    path = tmp_path / "bad.parquet"
    write(path, rows)
    store = Store(":memory:")
    with pytest.raises(ImportFailed, match=r"bad.parquet, row 18: field 'winner' is 'model_c'"):
        import_file(store, path)
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM comparisons").fetchone()[0] == 0
    rows[17]["winner"] = "tie"
    rows[5]["conversation_b"] = rows[5]["conversation_a"]  # identical conversations
    write(path, rows)
    with pytest.raises(ImportFailed, match=r"row 6: the two conversations are identical"):
        import_file(store, path)
    store.close()


def test_a_file_imported_row_by_row_before_adds_nothing_in_bulk(tmp_path, monkeypatch):
    path = tmp_path / "arena.jsonl"
    write(path, arena_rows())
    store = Store(":memory:")
    with monkeypatch.context() as patch:
        patch.setattr(importers, "bulk_import", lambda *a: None)
        first = import_file(store, path)
    before = contents(store)
    used = []
    monkeypatch.setattr(import_bulk, "_write", counted(import_bulk._write, used))
    assert import_file(store, path) == first and used == [1]
    assert contents(store) == before  # same keys and hashes: nothing new
    store.close()


def test_a_store_from_before_m008_keeps_its_rows_and_still_dedupes(tmp_path, monkeypatch):
    """m008 rebuilds prompts and comparisons without their UNIQUE constraints on DuckDB: the rows stay, and a file
    holding judgements stored before adds only the new ones, exactly as in a store that never had the constraints."""
    from storage import db as db_module
    from storage.migrations import MIGRATIONS, apply_migrations

    assert MIGRATIONS[-1].__name__ == "m008_keys_without_unique_index"
    part, whole = tmp_path / "part.parquet", tmp_path / "whole.parquet"
    write(part, arena_rows()[:20])
    write(whole, arena_rows())
    results = {}
    for name in ("old", "new"):
        with monkeypatch.context() as patch:
            if name == "old":  # the store as it was before m008, with the constraints in place
                patch.setattr(db_module, "apply_migrations", lambda con: apply_migrations(con, MIGRATIONS[:-1]))
            store = Store(tmp_path / f"{name}.duckdb")
            import_file(store, part)
            store.close()
        store = Store(tmp_path / f"{name}.duckdb")  # the old one gets m008 now
        with store.read() as cur:
            unique = "SELECT count(*) FROM duckdb_constraints() WHERE constraint_type = 'UNIQUE'"
            assert cur.execute(unique).fetchone()[0] == 0
            assert cur.execute("SELECT count(*) FROM comparisons").fetchone()[0] == 20
        summaries = [import_file(store, whole), import_file(store, part), import_file(store, whole)]
        results[name] = (contents(store), summaries)
        store.close()
    assert results["old"] == results["new"]
    stored, summaries = results["new"]
    assert len(stored["comparisons"]) == 40 and summaries[0] == summaries[2]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_odd_arena_extras_store_the_same_params_text_both_ways(tmp_path, monkeypatch, suffix):
    """Each answer's params as the row importer writes them (json.dumps): strings with every escape, question ids of
    any plain type, doubles DuckDB writes otherwise (1e+16, 1e-05) and later turns. The bulk path wrote to_json()
    text (no spaces in the continuation, other escapes), a different text for the same JSON value."""
    files = []
    for name, ids, stamps in (("text", [f"q {ODD} {i}" for i in range(6)], [1_700_000_000.25, 0.5, -3.75, 0.0001]),
                              ("ints", list(range(6)), [1e16, 1e-05, 5.0, 0.0]),
                              ("bools", [True, False] * 3, [None, 2.5, None, 1e300]),
                              ("whole", [f"w{i}" for i in range(6)], [5, 2.5, 7, 0.25])):  # fmt: skip
        rows = arena_rows()[:6]
        for i, row in enumerate(rows):
            row.update(question_id=ids[i], tstamp=stamps[i % len(stamps)], language=f"{ODD} {i}" if i % 2 else None)
            row["conversation_a"] = row["conversation_a"] + chat(("user", f"Then? {ODD}"), ("assistant", f"{ODD}!"))
        path = tmp_path / f"{name}{suffix}"
        write(path, rows)
        files.append((path, "arena"))
    bulk, rows, (_, used), _ = both_ways(tmp_path, monkeypatch, files)
    assert bulk == rows
    # in bulk: the text file, and the whole-number doubles of parquet; a double DuckDB writes otherwise (1e+16), or
    # one of JSON Lines written as a whole number (5, read as 5.0), goes row by row
    assert used == [1] * (2 if suffix == ".parquet" else 1)
    params = [json.loads(generation[-1]) for generation in bulk["generations"]]
    assert params[0]["continuation"][-1] == {"role": "assistant", "content": f"{ODD}!"}

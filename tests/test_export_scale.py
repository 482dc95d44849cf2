"""dpo / reward exports written by DuckDB hold exactly the rows the Python definition makes (export_rows)."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from storage import exporters
from storage.db import Store
from storage.exporters import export, export_rows
from tests.test_tallies import add_judgements


@pytest.mark.parametrize(("fmt", "chunk"), [("dpo", 50_000), ("reward", 7)])
def test_sql_written_pair_exports_equal_the_python_rows(tmp_path, monkeypatch, fmt, chunk):
    monkeypatch.setattr(exporters, "PAIR_CHUNK", chunk)  # 7: many queries, each sorted on its own
    store = Store(":memory:")
    add_judgements(store, random.Random(11), 150)  # equal texts, self pairs, blank / equal / real edits, undos
    expected = export_rows(store, fmt)
    assert len(expected) > 50
    assert export(store, fmt, tmp_path / "out.jsonl") == len(expected)
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n")
    assert [json.loads(line) for line in lines if line] == expected
    assert export(store, fmt, tmp_path / "out.parquet") == len(expected)
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == expected
    store.close()

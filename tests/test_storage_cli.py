"""`python -m storage` as a real subprocess: exit codes, the JSON line on stdout, the one error line on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from storage.db import Store

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, db: Path | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PREFLOOP_DB"}
    if db is not None:
        env["PREFLOOP_DB"] = str(db)  # the --db default comes from the environment
    return subprocess.run([sys.executable, "-m", "storage", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # no traceback
    for fragment in fragments:
        assert fragment in lines[0]


def comparisons_in(db: Path) -> int:
    store = Store(db)
    try:
        with store.read() as cur:
            return cur.execute("SELECT count(*) FROM comparisons").fetchone()[0]
    finally:
        store.close()


def write_prefs(path: Path) -> Path:
    rows = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
            {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "Rock."}]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_import_prints_one_json_line_and_reimport_adds_nothing(tmp_path, db_url):
    db, prefs = db_url, write_prefs(tmp_path / "prefs.jsonl")
    first = run_cli("import", str(prefs), "--db", str(db))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"format": "trl", "prompts": 2, "comparisons": 2}
    assert len(first.stdout.strip().splitlines()) == 1
    again = run_cli("import", str(prefs), "--db", str(db), "--format", "trl")
    assert again.returncode == 0 and json.loads(again.stdout) == json.loads(first.stdout)
    assert comparisons_in(db) == 2


def test_db_default_comes_from_prefloop_db(tmp_path):
    db = tmp_path / "from-env.duckdb"
    result = run_cli("import", str(write_prefs(tmp_path / "prefs.jsonl")), db=db)
    assert result.returncode == 0, result.stderr
    assert comparisons_in(db) == 2


def test_import_errors_are_one_line_and_write_nothing(tmp_path):
    db = tmp_path / "cli.duckdb"
    run_cli("import", str(write_prefs(tmp_path / "prefs.jsonl")), "--db", str(db))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Name a colour.", "chosen": "Blue."\n', encoding="utf-8")
    assert_one_error_line(run_cli("import", str(broken), "--db", str(db)), "broken.jsonl, line 1", "not valid JSON")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\ncaf\u00e9\n".encode("latin-1"))
    assert_one_error_line(run_cli("import", str(latin), "--db", str(db)), "latin.txt, line 2", "not UTF-8")
    assert_one_error_line(run_cli("import", str(tmp_path / "absent.csv"), "--db", str(db)), "absent.csv: no such file")
    assert comparisons_in(db) == 2
    missing_db = tmp_path / "never.duckdb"
    assert_one_error_line(run_cli("import", str(tmp_path / "absent.csv"), "--db", str(missing_db)))
    assert not missing_db.exists()  # a failed import does not even create the database


def test_a_failed_import_into_a_new_database_leaves_no_file(tmp_path):
    """The file is opened (and set up) before the rows are checked: on failure it is removed, with its WAL and the
    folders made for it; a database that was there before stays."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Fine."}\n{"foo": 1}\n', encoding="utf-8")
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Hi.", "chosen": "Yes.", "rejected": "Yes."}) + "\n", encoding="utf-8")
    before = sorted(tmp_path.iterdir())
    for path, fragment in ((bad, "bad.jsonl, line 2"), (same, "are the same text")):
        for db in (tmp_path / "fresh.duckdb", tmp_path / "new" / "folder" / "fresh.duckdb"):
            assert_one_error_line(run_cli("import", str(path), "--db", str(db)), fragment)
            assert sorted(tmp_path.iterdir()) == before  # no .duckdb, no .wal, no folder
    existing = tmp_path / "kept.duckdb"
    assert run_cli("import", str(write_prefs(tmp_path / "prefs.jsonl")), "--db", str(existing)).returncode == 0
    assert_one_error_line(run_cli("import", str(bad), "--db", str(existing)), "bad.jsonl, line 2")
    assert comparisons_in(existing) == 2


def test_a_directory_to_import_is_named_as_one(tmp_path):
    folder = tmp_path / "prefs.jsonl"
    folder.mkdir()
    db = tmp_path / "cli.duckdb"
    assert_one_error_line(run_cli("import", str(folder), "--db", str(db)), f"{folder} is a directory, not a file")
    assert not db.exists()


def test_reading_commands_refuse_a_database_that_is_not_there(tmp_path):
    """A mistyped --db is an error, not a new empty database with zero counts (import is what creates one)."""
    out = tmp_path / "dpo.jsonl"
    for db in (tmp_path / "fresh2.duckdb", tmp_path / "missing" / "nodb.duckdb"):
        for command in (["stats"], ["export", "--format", "dpo", "--out", str(out)], ["leaderboard"]):
            result = run_cli(*command, "--db", str(db))
            assert_one_error_line(result, f"--db {db}: no such database file (python -m storage import creates one)")
        assert_one_error_line(run_cli("stats", db=db), str(db))  # the default --db ($PREFLOOP_DB) too
    assert_one_error_line(run_cli("stats", "--db", str(tmp_path)), "is a directory, not a database file")
    assert list(tmp_path.iterdir()) == []  # no database, no WAL, no export, no folder


def test_export_and_stats(tmp_path, db_url):
    db = db_url
    run_cli("import", str(write_prefs(tmp_path / "prefs.jsonl")), "--db", str(db))
    out = tmp_path / "dpo.parquet"
    result = run_cli("export", "--format", "dpo", "--out", str(out), "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"format": "dpo", "rows": 2, "out": str(out)}
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("chosen").to_pylist()[0] == [{"role": "assistant", "content": "Blue."}]
    stats = run_cli("stats", "--db", str(db))
    assert stats.returncode == 0, stats.stderr
    summary = json.loads(stats.stdout)
    assert (summary["prompts"], summary["comparisons"], summary["per_source"]) == (2, 2, {"import:trl": 2})
    board = run_cli("leaderboard", "--db", str(db))  # trl rows: the chosen side won both battles
    assert board.returncode == 0, board.stderr
    assert [(m["model"], m["battles"]) for m in json.loads(board.stdout)] == [
        ("import:chosen", 2),
        ("import:rejected", 2),
    ]


def test_export_errors(tmp_path):
    db = tmp_path / "cli.duckdb"
    bad_ext = run_cli("export", "--format", "dpo", "--out", str(tmp_path / "out.csv"), "--db", str(db))
    assert_one_error_line(bad_ext, "out.csv must end in .jsonl or .parquet")
    bad_format = run_cli("export", "--format", "nope", "--out", str(tmp_path / "out.jsonl"), "--db", str(db))
    assert_one_error_line(bad_format, "argument --format: invalid choice: 'nope'")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_database_held_by_another_process_is_named_clearly(tmp_path):
    db = tmp_path / "held.duckdb"
    holder = Store(db)  # this test process plays the running app
    try:
        result = run_cli("stats", "--db", str(db))
        assert_one_error_line(result, str(db), "is in use by another process")
    finally:
        holder.close()
    assert run_cli("stats", "--db", str(db)).returncode == 0


def test_push_to_hub_failure_is_one_line_and_keeps_the_file(tmp_path):
    """No network here (HF_HUB_OFFLINE=1): the push fails clearly, the local export is still written."""
    db = tmp_path / "cli.duckdb"
    run_cli("import", str(write_prefs(tmp_path / "prefs.jsonl")), "--db", str(db))
    out = tmp_path / "dpo.jsonl"
    result = run_cli("export", "--format", "dpo", "--out", str(out), "--db", str(db), "--push-to-hub", "me/prefs")
    assert_one_error_line(result, f"wrote {out}, but pushing to the Hugging Face Hub repo me/prefs failed")
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2

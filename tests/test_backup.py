"""Backups that survive losing the disk: parquet shards, restore into a new file, the scheduler."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage import backup
from storage.backup import (
    SNAPSHOT_TABLES,
    TABLES,
    Backup,
    BackupError,
    BackupScheduler,
    list_shards,
    restore,
)
from storage.backup_hub import HubSyncError
from storage.db import Store
from storage.promotions import serve
from storage.scores import save_scores


# ---- helpers ------------------------------------------------------------------------------------------------------
def fill(store: Store, tag: str, votes: int = 3) -> None:
    """A prompt, two answers, a pair, judgements (one undone), a model version served (a promotions row), a run,
    settings and scores."""
    prompt = store.add_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": tag}], "test")
    a = store.add_generation(prompt, f"{tag} answer A", model_version_id=0, params={"t": 0.7}, token_count=3)
    b = store.add_generation(prompt, f"{tag} answer B", model_name="other", latency_ms=12.5)
    with store.transaction() as cur:
        pair = cur.execute(
            "INSERT INTO pairs (id, prompt_id, strategy, generation_a, generation_b) "
            "VALUES (nextval('pairs_id_seq'), ?, 'self', ?, ?) RETURNING id",
            [prompt, a, b],
        ).fetchone()[0]
        cur.execute(
            "INSERT INTO training_runs (id, method, status, config, created_at) "
            "VALUES (nextval('training_runs_id_seq'), 'dpo', 'queued', '{\"beta\": 0.1}', now())"
        )
    ids = [
        store.add_comparison(
            prompt_id=prompt,
            generation_a=a,
            generation_b=b,
            annotator=f"ann{i}",
            choice="A",
            pair_id=pair,
            rationale=f"why {i}",
            time_spent_s=1.5,
        )  # fmt: skip
        for i in range(votes)
    ]
    store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="ed", choice="B",
                         edited_answer="better", dedupe_key=f"import-{tag}", source="import")  # fmt: skip
    store.undo_comparison(ids[0], "ann0")
    with store.transaction() as cur:
        cur.execute("UPDATE pairs SET status = 'done' WHERE id = ?", [pair])
        cur.execute("UPDATE training_runs SET status = 'succeeded', started_at = now()")
    version = store.add_version(base_model="tiny", adapter_path=f"runs/{tag}/adapter", metrics={"loss": 0.5})
    store.set_setting("active_version", str(version))
    serve(store, version, 0, "override", {"wins": 1, "battles": 1}, "tester")  # a promotions row, status 'serving'
    save_scores(store, version, [(a, 0.25), (b, -1.0)])


def dump(store: Store) -> dict[str, list[tuple]]:
    """Every backed-up table's rows in key order."""
    keys = {**backup.ROW_TABLES, **SNAPSHOT_TABLES}
    with store.read() as cur:
        return {table: cur.execute(f"SELECT * FROM {table} ORDER BY {keys[table]}").fetchall() for table in TABLES}


def shard_ids(path: Path) -> list[int]:
    return pq.read_table(path).column("id").to_pylist()


def lose_disk(store: Store) -> None:
    store.close()
    for file in Path(store.path).parent.glob(Path(store.path).name + "*"):
        file.unlink()


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db" / "prefloop.duckdb")
    yield s
    s.close()


# ---- flush and restore --------------------------------------------------------------------------------------------
def test_flush_twice_lose_the_disk_restore_everything_with_the_same_ids(store, tmp_path):
    folder = tmp_path / "backup"
    fill(store, "first")
    first = Backup(store, folder).flush()
    assert first["flush"] == 1 and first["rows"]["comparisons"] == 5 and first["not_backed_up"] == []
    fill(store, "second", votes=2)
    second = Backup(store, folder).flush()  # a new process: continues from the manifest
    assert second["flush"] == 2 and second["rows"]["comparisons"] == 4
    (one, old), (two, new) = list_shards(folder, "comparisons")
    assert (one, two) == (1, 2) and shard_ids(old) == [1, 2, 3, 4, 5] and shard_ids(new) == [6, 7, 8, 9]
    assert shard_ids(list_shards(folder, "generations")[1][1]) == [3, 4]
    before = dump(store)
    assert len(before["model_versions"]) == 3 and len(before["training_runs"]) == 2
    lose_disk(store)

    again = Store(tmp_path / "new" / "prefloop.duckdb")
    counts = restore(again, folder)
    assert dump(again) == before
    assert counts == {table: len(rows) - (table == "model_versions") for table, rows in before.items()}
    assert set(restore(again, folder).values()) == {0}  # restoring twice adds nothing
    assert dump(again) == before
    again.close()


def test_new_rows_after_a_restore_get_fresh_ids_even_after_reopening(store, tmp_path):
    folder = tmp_path / "backup"
    fill(store, "x")
    fill(store, "y")
    Backup(store, folder).flush()
    top = {table: max(row[0] for row in rows) for table, rows in dump(store).items() if table in backup.ID_TABLES}
    lose_disk(store)
    path = tmp_path / "new.duckdb"
    again = Store(path)
    restore(again, folder)
    again.close()
    again = Store(path)  # the moved sequences are durable
    fill(again, "z")
    after = dump(again)
    for table in backup.ID_TABLES:
        new_ids = [row[0] for row in after[table] if row[0] > top[table]]
        assert new_ids and len({row[0] for row in after[table]}) == len(after[table]), table
    again.close()


def test_restoring_then_flushing_writes_no_new_shards(store, tmp_path):
    folder = tmp_path / "backup"
    fill(store, "a")
    Backup(store, folder).flush()
    lose_disk(store)
    again = Store(tmp_path / "new.duckdb")
    restore(again, folder)
    files = sorted(folder.rglob("*.parquet"))
    assert Backup(again, folder).flush()["flush"] is None
    (folder / "manifest.json").unlink()  # a pulled folder has no manifest: the shards say the same
    assert Backup(again, folder).flush()["flush"] is None
    assert sorted(folder.rglob("*.parquet")) == files
    fill(again, "b")
    written = Backup(again, folder).flush()
    assert written["flush"] == 2 and written["rows"]["comparisons"] == 5
    again.close()


def test_a_crash_mid_flush_leaves_earlier_shards_valid(store, tmp_path, monkeypatch):
    folder = tmp_path / "backup"
    fill(store, "a")
    keeper = Backup(store, folder)
    keeper.flush()
    fill(store, "b")
    calls = []

    def crash(path, reader, meta):
        calls.append(meta["table"])
        if len(calls) == 2:  # the first table's shard lands, the second dies half written
            path.write_bytes(b"PAR1 half a shard")
            raise OSError("disk full")
        real(path, reader, meta)

    real = backup._write_parquet
    monkeypatch.setattr(backup, "_write_parquet", crash)
    with pytest.raises(OSError, match="disk full"):
        keeper.flush()
    monkeypatch.setattr(backup, "_write_parquet", real)
    assert not list(folder.rglob("*.tmp"))
    for table in TABLES:
        for _, path in list_shards(folder, table):
            pq.read_table(path)  # every shard on disk is whole
    assert len(list_shards(folder, calls[0])) == 2 and len(list_shards(folder, calls[1])) == 1
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["flush"] == 2  # the shard that landed is recorded
    rest = Backup(store, folder).flush()  # the next flush (here: a new process) writes what is left
    assert rest["flush"] == 3 and calls[0] not in rest["rows"] and calls[1] in rest["rows"]
    before = dump(store)
    lose_disk(store)
    again = Store(tmp_path / "new.duckdb")
    restore(again, folder)
    assert dump(again) == before
    again.close()


def test_a_crash_between_shard_and_manifest_is_folded_in(store, tmp_path):
    folder = tmp_path / "backup"
    fill(store, "a")
    Backup(store, folder).flush()
    stale = (folder / "manifest.json").read_text()
    fill(store, "b")
    Backup(store, folder).flush()
    (folder / "manifest.json").write_text(stale)  # as if the process died before writing the manifest
    assert Backup(store, folder).flush()["flush"] is None


def test_a_database_behind_its_backup_folder_is_refused(store, tmp_path):
    folder = tmp_path / "backup"
    fill(store, "a")
    Backup(store, folder).flush()
    other = Store(tmp_path / "other.duckdb")  # started empty without restoring: its ids would be reused
    fill(other, "b", votes=1)
    with pytest.raises(BackupError, match="does not hold the prompts row 1 .* restore the backup"):
        Backup(other, folder).flush()
    fill(other, "c", votes=9)  # even once it has more rows than the backup: same ids, other rows
    with pytest.raises(BackupError, match="restore the backup"):
        Backup(other, folder).flush()
    assert [n for n, _ in list_shards(folder, "pairs")] == [1]
    other.close()


def test_only_the_newest_snapshots_stay_and_unchanged_tables_write_nothing(store, tmp_path):
    folder = tmp_path / "backup"
    fill(store, "a")
    keeper = Backup(store, folder)
    keeper.flush()
    for status in ("leased", "ready", "done"):
        with store.transaction() as cur:
            cur.execute("UPDATE pairs SET status = ?", [status])
        assert keeper.flush()["rows"] == {"pairs": 1}
    assert [n for n, _ in list_shards(folder, "pairs")] == [3, 4]
    assert [n for n, _ in list_shards(folder, "training_runs")] == [1]
    assert json.loads((folder / "manifest.json").read_text())["pruned"][0].startswith("pairs/000001-")
    assert keeper.flush()["flush"] is None


def test_flushing_does_not_hold_the_write_lock(store, tmp_path, monkeypatch):
    fill(store, "a")
    writing, release = threading.Event(), threading.Event()
    real = backup._write_parquet

    def slow(path, reader, meta):
        writing.set()
        release.wait(10)
        real(path, reader, meta)

    monkeypatch.setattr(backup, "_write_parquet", slow)
    flusher = threading.Thread(target=Backup(store, tmp_path / "backup").flush)
    flusher.start()
    assert writing.wait(10)
    started = time.monotonic()
    store.add_comparison(prompt_id=1, generation_a=1, generation_b=2, annotator="voter", choice="tie")
    assert time.monotonic() - started < 2  # a vote commits while the flush is still writing
    release.set()
    flusher.join(10)


# ---- the scheduler ------------------------------------------------------------------------------------------------
def test_the_scheduler_flushes_periodically_and_once_more_at_stop(store, tmp_path):
    folder = tmp_path / "backup"
    fill(store, "a")
    scheduler = BackupScheduler(store, folder, every_s=0.05)
    deadline = time.monotonic() + 10
    while scheduler.last_result is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.last_result["flush"] == 1
    time.sleep(0.2)  # nothing new: no more shards
    assert len(list_shards(folder, "comparisons")) == 1
    late = store.add_comparison(prompt_id=1, generation_a=1, generation_b=2, annotator="late", choice="A")
    scheduler.stop(flush=True)
    assert not scheduler._thread.is_alive() and scheduler.last_error is None
    shards = list_shards(folder, "comparisons")
    assert len(shards) == 2 and shard_ids(shards[-1][1]) == [late]
    for bad in (0, float("nan"), 1e300):  # nan flushed without pause; 1e300 killed the thread (OverflowError)
        with pytest.raises(ValueError, match="every_s must be in"):
            BackupScheduler(store, folder, every_s=bad)


class FakeHub:
    """Stands in for HubSync in scheduler tests: records pushes, fails while `broken`."""

    def __init__(self):
        self.pushes, self.broken = [], False

    def push(self, extra=None):
        if self.broken:
            raise HubSyncError("Hub push failed: down")
        self.pushes.append(extra)
        return {"commits": []}


def test_the_scheduler_pushes_after_flushes_that_wrote_and_retries_a_failed_push(store, tmp_path):
    fill(store, "a")
    hub = FakeHub()
    scheduler = BackupScheduler(store, tmp_path / "backup", every_s=3600, hub=hub, extra=lambda: {"adapters": "x"})
    assert scheduler.run_now()["hub"] == {"commits": []} and hub.pushes == [{"adapters": "x"}]
    assert "hub" not in scheduler.run_now()  # nothing new: no push
    hub.broken = True
    store.add_comparison(prompt_id=1, generation_a=1, generation_b=2, annotator="late", choice="A")
    assert scheduler.run_now() is None and "down" in scheduler.last_error
    hub.broken = False
    assert scheduler.stop(flush=True)["flush"] is None and len(hub.pushes) == 2  # the failed push is retried
    assert scheduler.last_error is None


def test_the_app_refuses_a_backup_period_it_cannot_keep(capsys):
    import app

    for bad in ("nan", "1e300", "0"):
        with pytest.raises(SystemExit) as stopped:
            app.parse_args(["--backup-every", bad])
        assert stopped.value.code == 2 and "--backup-every must be a number of seconds in" in capsys.readouterr().err
    assert app.parse_args(["--backup-every", "60"]).backup_every == 60


def test_a_restore_skips_prompts_and_imports_the_store_has_under_other_ids(tmp_path):
    """Prompts (by hash) and imported judgements (by dedupe key) are unique by the app's rules, but have no UNIQUE
    constraint on DuckDB any more: a restore into a store that had them under other ids stored them twice."""
    source, folder = Store(tmp_path / "a.duckdb"), tmp_path / "backup"
    for i in range(3):
        source.add_prompt(f"Filler {i}?", "test")
    prompt = source.add_prompt("Which is the shared one?", "test")  # id 4 here
    a, b = source.add_generation(prompt, "One.", model_name="m"), source.add_generation(prompt, "Two.", model_name="m")
    source.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="x", choice="B")
    source.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="x", choice="A", dedupe_key="k1")
    Backup(source, folder).flush()  # the keyed judgement is comparison 2 here
    source.close()
    target = Store(tmp_path / "b.duckdb")
    shared = target.add_prompt("Which is the shared one?", "test")  # prompt 1 there
    a, b = target.add_generation(shared, "One.", model_name="m"), target.add_generation(shared, "Two.", model_name="m")
    target.add_comparison(prompt_id=shared, generation_a=a, generation_b=b, annotator="x", choice="A", dedupe_key="k1")
    restore(target, folder)  # comparison 1 there
    with target.read() as cur:
        assert cur.execute("SELECT count(*) FROM prompts WHERE text = 'Which is the shared one?'").fetchone()[0] == 1
        assert cur.execute("SELECT count(*) FROM comparisons WHERE dedupe_key = 'k1'").fetchone()[0] == 1
    target.close()

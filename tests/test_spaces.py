"""Running as a Space: votes survive losing the disk (backups wired into the app), logins with Hugging Face OAuth,
training off on CPU hardware unless an admin turns it on. The apps here are real `python app.py` processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labeling.backups import relink_adapters, run_adapters
from storage.backup import restore
from storage.db import Store
from tests.apprun import app_process

pytestmark = pytest.mark.slow


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A real (tiny) PEFT LoRA adapter for the tiny model, as a DPO run leaves it in <run dir>/adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


def add_run_and_version(store: Store, runs: Path, model_dir: Path) -> tuple[int, int]:
    """A succeeded DPO run and the policy version it registered, with its adapter on disk."""
    run_dir = runs / "run-0001-dpo"
    make_adapter(model_dir, run_dir / "adapter")
    with store.transaction() as cur:
        run_id = cur.execute(
            "INSERT INTO training_runs (id, method, status, config, run_dir, snapshot_rows, created_at) "
            "VALUES (nextval('training_runs_id_seq'), 'dpo', 'succeeded', '{}', ?, 12, now()) RETURNING id",
            [str(run_dir)],
        ).fetchone()[0]
    version = store.add_version(base_model=str(model_dir), adapter_path=str(run_dir / "adapter"), parent_id=0,
                                run_id=run_id, notes="dpo run 1", metrics={"loss": 0.5})  # fmt: skip
    return run_id, version


def table(db: Path, sql: str) -> list[tuple]:
    store = Store(db)
    try:
        with store.read() as cur:
            return cur.execute(sql).fetchall()
    finally:
        store.close()


def vote_some(url: str, votes: int) -> list[tuple[int, str, str]]:
    """Lease and judge `votes` pairs through the named API; the (pair, annotator, choice) the app acknowledged."""
    import time

    from gradio_client import Client

    client, done, choices = Client(url, verbose=False), [], ["A", "B", "tie", "both_bad"]
    deadline = time.monotonic() + 180
    while len(done) < votes:
        assert time.monotonic() < deadline, "no pairs came"
        pair_id, *_ = client.predict("alice", api_name="/next_pair")
        if pair_id is None:
            time.sleep(0.5)
            continue
        choice = choices[len(done) % 4]
        assert client.predict(pair_id, "alice", choice, "why not", "", api_name="/vote") == "ok"
        done.append((int(pair_id), "alice", choice))
    return done


COMPARISONS = "SELECT pair_id, annotator, choice FROM effective_comparisons ORDER BY id"
EVERYTHING = {
    "comparisons": "SELECT id, pair_id, annotator, choice, rationale, created_at FROM comparisons ORDER BY id",
    "runs": "SELECT id, method, status, run_dir, snapshot_rows FROM training_runs ORDER BY id",
    "versions": "SELECT id, kind, adapter_path, parent_id, run_id, notes, metrics FROM model_versions ORDER BY id",
    "generations": "SELECT id, prompt_id, text FROM generations ORDER BY id",
    "prompts": "SELECT id, hash FROM prompts ORDER BY id",
}


def test_votes_survive_losing_the_database(tmp_path, tiny_model_dir):
    db, backups, runs = tmp_path / "db" / "app.duckdb", tmp_path / "backups", tmp_path / "runs"
    store = Store(db)
    run_id, version = add_run_and_version(store, runs, tiny_model_dir)
    store.close()
    args = ("--db", str(db), "--runs-dir", str(runs), "--backup-dir", str(backups), "--backup-every", "3600",
            "--strategy", "self", "--queue-size", "4")  # fmt: skip

    with app_process(tmp_path, tiny_model_dir, *args, name="first") as app:
        acknowledged = vote_some(app.url, 5)
        assert app.terminate() == 143  # 128 + SIGTERM, after the shutdown steps
        assert "backup flushed" in app.output()
    before = {name: table(db, sql) for name, sql in EVERYTHING.items()}
    assert table(db, COMPARISONS) == acknowledged  # the hourly flush never ran: only the shutdown flush has them

    db.unlink()
    Path(f"{db}.wal").unlink(missing_ok=True)
    with app_process(tmp_path, tiny_model_dir, *args, name="second") as app:
        assert app.terminate() == 143
        assert "restored" in app.output()
    after = {name: table(db, sql) for name, sql in EVERYTHING.items()}
    for name, rows in before.items():  # every row as it was, same ids (the second app may add pairs and prompts)
        assert after[name][: len(rows)] == rows, name
    assert table(db, COMPARISONS) == acknowledged
    assert (run_id, version) == (after["runs"][0][0], after["versions"][1][0])

    store = Store(db)
    try:
        assert set(restore(store, backups).values()) == {0}  # restoring twice adds nothing
    finally:
        store.close()


def test_a_pulled_adapter_is_put_where_the_runner_keeps_them(tmp_path, tiny_model_dir):
    """A fresh disk: the version's adapter folder is gone, the Hub pull brought `adapters/<run folder>/`."""
    old_runs, new_runs, backups = tmp_path / "old-runs", tmp_path / "runs", tmp_path / "backups"
    store = Store(":memory:")
    try:
        run_id, version = add_run_and_version(store, old_runs, tiny_model_dir)
        assert list(run_adapters(old_runs)) == ["adapters/run-0001-dpo"]  # what each push uploads
        (backups / "adapters").mkdir(parents=True)
        (old_runs / "run-0001-dpo" / "adapter").rename(backups / "adapters" / "run-0001-dpo")  # pulled; disk lost

        assert relink_adapters(store, backups, new_runs) == [version]
        moved = new_runs / "run-0001-dpo" / "adapter"
        assert store.get_version(version)["adapter_path"] == str(moved)
        assert json.loads((moved / "adapter_config.json").read_text())["r"] == 2
        with store.read() as cur:
            assert cur.execute("SELECT run_dir FROM training_runs WHERE id = ?", [run_id]).fetchone()[0] == str(
                moved.parent
            )
        assert relink_adapters(store, backups, new_runs) == []  # in place now: nothing to do
    finally:
        store.close()

"""Running as a Space: votes survive losing the disk (backups wired into the app), training off on CPU hardware
unless an admin turns it on (logins with Hugging Face OAuth: test_spaces_login.py). The apps here are real
`python app.py` processes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from labeling.backups import relink_adapters, run_adapters
from storage.backup import restore
from storage.db import Store
from tests.apprun import app_process, table

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
    version = store.add_version(
        base_model=str(model_dir),
        adapter_path=str(run_dir / "adapter"),
        parent_id=0,
        run_id=run_id,
        notes="dpo run 1",
        metrics={"loss": 0.5},
    )
    return run_id, version


def contents(store: Store) -> dict[str, list[tuple]]:
    with store.read() as cur:
        return {name: cur.execute(sql).fetchall() for name, sql in EVERYTHING.items()}


def vote_some(url: str, votes: int) -> list[tuple[int, str, str]]:
    """Lease and judge `votes` pairs through the named API; the (pair, annotator, choice) the app acknowledged."""
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
    args = (
        "--db",
        str(db),
        "--runs-dir",
        str(runs),
        "--backup-dir",
        str(backups),
        "--backup-every",
        "3600",
        "--strategy",
        "self",
        "--queue-size",
        "4",
    )

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


# ---- training on a CPU Space ---------------------------------------------------------------------------------------
def test_training_is_off_on_a_cpu_space_until_an_admin_allows_it(monkeypatch):
    from types import SimpleNamespace

    from labeling.access import Access
    from labeling.deploy import TrainingSwitch, on_cpu_space
    from ui.train_tab import TrainHandlers

    cpu, gpu = SimpleNamespace(placement=SimpleNamespace(device="cpu")), SimpleNamespace(placement=None)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not on_cpu_space(cpu)  # not a Space: training is always on
    monkeypatch.setenv("SPACE_ID", "team/prefloop")
    monkeypatch.delenv("SPACE_HARDWARE", raising=False)
    assert on_cpu_space(cpu)
    monkeypatch.setenv("SPACE_HARDWARE", "t4-small")
    assert not on_cpu_space(cpu)
    monkeypatch.setenv("SPACE_HARDWARE", "cpu-upgrade")
    assert on_cpu_space(gpu)

    store = Store(":memory:")
    try:
        switch = TrainingSwitch(store, cpu_space=True)
        assert "Training is off on this CPU Space" in switch.blocked()
        handlers = TrainHandlers(SimpleNamespace(training_switch=switch), Access(local=True))  # the local admin
        note, toggle = handlers.training_state()
        assert "off" in note and toggle["value"] is False and toggle["interactive"] is True
        note, toggle = handlers.allow_training(True, None)
        assert switch.blocked() is None and store.get_setting("allow_training_on_cpu_space") == "1"
        assert toggle["value"] is True and "on for this CPU Space" in note
        handlers.allow_training(False, None)
        assert switch.blocked()
        refused = TrainHandlers(SimpleNamespace(training_switch=switch), Access(local=False))  # not an admin
        assert "admins" in refused.allow_training(True, None)[0] and switch.blocked()
        monkeypatch.setenv("PREFLOOP_ALLOW_TRAINING", "1")  # the Space variable wins, and the toggle is locked on
        assert switch.blocked() is None and handlers.training_state()[1]["interactive"] is False
        assert TrainingSwitch(store, cpu_space=False).blocked() is None
    finally:
        store.close()


def test_a_fresh_disk_on_a_space_pulls_restores_and_serves_its_adapters_again(tmp_path, tiny_model_dir, monkeypatch):
    """start_backups against a stand-in Hub: the repo holds the shards and adapters/<run folder>/ of earlier pushes;
    a new database gets every row back and its version points at the pulled adapter, under the runs folder."""
    import http.server
    import shutil
    import threading

    import huggingface_hub.constants

    from labeling.backups import BackupStartError, start_backups
    from storage.backup import Backup
    from tests.test_backup_hub import Recorder, closed_port

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # talks to 127.0.0.1 only
    store = Store(tmp_path / "old.duckdb")
    run_id, version = add_run_and_version(store, tmp_path / "old-runs", tiny_model_dir)
    store.add_prompt("Kept?", "test")
    Backup(store, tmp_path / "pushed").flush()
    before = contents(store)
    store.close()
    repo = tmp_path / "pushed"  # what the Hub holds after earlier pushes: the backup folder plus the adapters
    shutil.copytree(tmp_path / "old-runs" / "run-0001-dpo" / "adapter", repo / "adapters" / "run-0001-dpo")
    shutil.rmtree(tmp_path / "old-runs")  # the disk is gone

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.seen, server.repo = [], repo
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    new = Store(tmp_path / "new.duckdb")
    try:
        lines = []
        setup = start_backups(
            new,
            tmp_path / "backups",
            new_db=True,
            runs_dir=tmp_path / "runs",
            hub_repo="someone/data",
            log=lines.append,
        )
        setup.scheduler.stop(flush=False)
        after, moved = contents(new), ("versions", "runs")  # the same rows; versions and runs point at the new folder
        assert {k: v for k, v in after.items() if k not in moved} == {
            k: v for k, v in before.items() if k not in moved
        }
        assert after["runs"][0][0] == run_id and after["runs"][0][3] == str(tmp_path / "runs" / "run-0001-dpo")
        assert setup.relinked == [version] and setup.restored["comparisons"] == 0 and setup.restored["prompts"] == 1
        served = new.get_version(version)["adapter_path"]
        assert (
            served == str(tmp_path / "runs" / "run-0001-dpo" / "adapter")
            and Path(served, "adapter_config.json").is_file()
        )
        assert any("pulled" in line for line in lines) and any("restored" in line for line in lines)

        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # the Hub is unreachable
        with pytest.raises(BackupStartError, match="database is new"):
            start_backups(
                Store(":memory:"),
                tmp_path / "elsewhere",
                new_db=True,
                runs_dir=tmp_path / "r",
                hub_repo="someone/data",
                log=lines.append,
            )
        kept = start_backups(
            new,
            tmp_path / "backups",
            new_db=False,
            runs_dir=tmp_path / "runs",
            hub_repo="someone/data",
            log=lines.append,
        )
        kept.scheduler.stop(flush=False)
        assert "kept and pushed as usual" in lines[-1]
    finally:
        new.close()
        server.shutdown()
        server.server_close()

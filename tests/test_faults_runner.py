"""Faults around training children (issue 11): a child that outlives a killed app, SIGTERM of the app, a reused pid,
a run row whose folder was never written, and a run whose result could not be recorded. Real processes, signals,
DuckDB files and DPO children on the tiny model."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.db import Store
from tests.datahelpers import QUICK_RUN, seed_preferences
from training import runner as runner_module
from training.children import Child, Children, process_identity
from training.runner import JobRunner, RunRejected, read_progress

REPO = Path(__file__).resolve().parent.parent
LONG = {**QUICK_RUN, "max_steps": 2000}  # runs until cancelled

# An app as far as training goes: the store, the runner, and app.py's shutdown steps (labeling/lifecycle.py).
RUNNER_APP = """
import sys, time
from labeling.lifecycle import Shutdown
from storage.db import Store
from training.runner import JobRunner

db, runs, model, cache = sys.argv[1:5]
store = Store(db)
runner = JobRunner(store, runs_dir=runs, base_model=model, model_cache=cache, poll_seconds=0.2)
shutdown = Shutdown()
shutdown.install()
shutdown.register("store", store.close)
shutdown.register("training runner", lambda: runner.stop(cancel_running=True))
runner.start()
print(runner.submit("dpo", {"max_steps": 2000, "batch_size": 2, "max_length": 64}), flush=True)
while True:
    time.sleep(1)
"""


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def runner_for(store, tmp_path, model_dir) -> JobRunner:
    return JobRunner(store, runs_dir=tmp_path / "runs", base_model=str(model_dir), model_cache=tmp_path / "cache")


def run_status(db: Path, run_id: int) -> tuple[str, str | None]:
    store = Store(db)
    try:
        with store.read() as cur:
            return cur.execute("SELECT status, error FROM training_runs WHERE id = ?", [run_id]).fetchone()
    finally:
        store.close()


def child_of(parent: int) -> Child:
    """The one child process of `parent` (the training child of the app-like runner)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                return Child.of(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    raise AssertionError(f"process {parent} has no child")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in the process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def start_runner_app(tmp_path: Path, model_dir: Path) -> tuple[subprocess.Popen, int, Path]:
    """The app-like runner in its own process, with a long DPO run started: (process, run id, run folder)."""
    db = tmp_path / "app.duckdb"
    if not db.exists():
        store = Store(db)
        seed_preferences(store, 16)
        store.close()
    script = tmp_path / "runner_app.py"
    script.write_text(RUNNER_APP)
    app = subprocess.Popen(
        [sys.executable, str(script), str(db), str(tmp_path / "runs"), str(model_dir), str(tmp_path / "cache")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        run_id = int(app.stdout.readline())
        run_dir = tmp_path / "runs" / f"run-{run_id:04d}-dpo"
        wait_for(lambda: any(e["event"] == "progress" for e in read_progress(run_dir)), 240, "the child's first step")
    except BaseException:
        with contextlib.suppress(AssertionError):
            child_of(app.pid).stop(grace=1)
        app.kill()
        raise
    return app, run_id, run_dir


def test_a_child_outlives_a_killed_app_and_the_next_app_adopts_it(tmp_path, tiny_model_dir):
    """kill -9 of the app left the run 'running' forever: it blocked every later run and Cancel could not reach it."""
    app, run_id, run_dir = start_runner_app(tmp_path, tiny_model_dir)
    child = child_of(app.pid)
    try:
        assert child.running()
        app.kill()  # SIGKILL: no shutdown step runs
        app.wait()
        assert child.running()  # its own session: the child goes on
        store = Store(tmp_path / "app.duckdb")
        runner = runner_for(store, tmp_path, tiny_model_dir)  # the app starts again
        try:
            assert runner.status(run_id).status == "running" and run_id in runner._children  # adopted
            assert Child.load(run_dir) == child  # known by pid and start time, from the run's own folder
            step = runner.status(run_id).last["step"]
            wait_for(lambda: runner.status(run_id).last["step"] > step, 60, "more progress from the adopted child")
            assert runner.cancel(run_id) == "stopping at the next step"
            ended = runner.wait(run_id, timeout=90)
            assert ended.status == "cancelled" and not child.running()
            wait_for(lambda: group_members(child.pid) == [], 5, "the adopted child to exit")
            next_id = runner.submit("dpo", QUICK_RUN)  # nothing blocks the queue
            assert runner.wait(next_id, timeout=300).status == "succeeded"
        finally:
            runner.stop(cancel_running=True)
            store.close()
    finally:
        app.kill()
        child.stop(grace=5)  # only while its pid and start time still match


def test_sigterm_of_the_app_ends_the_childs_process_group(tmp_path, tiny_model_dir):
    app, run_id, run_dir = start_runner_app(tmp_path, tiny_model_dir)
    child = child_of(app.pid)
    try:
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=60) == 128 + signal.SIGTERM
        wait_for(lambda: group_members(child.pid) == [], 2, "the child's process group to end")  # nothing is left
        status, _ = run_status(tmp_path / "app.duckdb", run_id)
        assert status == "cancelled"  # it saved, wrote its end line, and the app recorded it before closing the store
        assert read_progress(run_dir)[-1]["event"] == "end"
    finally:
        app.kill()
        child.stop(grace=5)


def test_shutdown_kills_what_the_child_started_and_a_child_that_ignores_sigterm(tmp_path):
    """The process group goes: a stubborn child (SIGTERM ignored) and the process it started."""
    script = "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    script += "subprocess.Popen(['sleep', '300']); print('ready', flush=True); time.sleep(300)"
    children = Children()
    pid = children.start(1, [sys.executable, "-c", script], tmp_path, dict(os.environ))
    wait_for(lambda: "ready" in (tmp_path / "log.txt").read_text(), 30, "the child to start its own child")
    assert len(group_members(pid)) == 2
    started = time.monotonic()
    children.stop_all(grace=1.0)
    wait_for(lambda: group_members(pid) == [], 5, "SIGKILL to reach the group")
    assert time.monotonic() - started < 5
    assert children.ended() == [(1, -signal.SIGKILL)]


def test_a_reused_pid_is_never_signalled(tmp_path, tiny_model_dir):
    """After a restart the recorded pid may belong to another process now: the run ends, the stranger lives."""
    stranger = subprocess.Popen(["sleep", "120"])
    try:
        boot, started, _ = process_identity(stranger.pid)
        store = Store(tmp_path / "reuse.duckdb")
        run_dirs = [tmp_path / "runs" / "run-0001-dpo", tmp_path / "runs" / "run-0002-dpo"]
        run_dirs[0].mkdir(parents=True)
        Child(stranger.pid, boot, started - 1).save(run_dirs[0])  # our child had this pid; it started earlier
        with store.transaction() as cur:  # and a row from before child.json existed, with the same live pid
            for run_dir in run_dirs:
                cur.execute(
                    "INSERT INTO training_runs (id, method, status, pid, run_dir, created_at) "
                    "VALUES (nextval('training_runs_id_seq'), 'dpo', 'running', ?, ?, now())",
                    [stranger.pid, str(run_dir)],
                )
        runner = runner_for(store, tmp_path, tiny_model_dir)
        try:
            for run_id in (1, 2):
                assert runner.status(run_id).status == "failed"
                runner.cancel(run_id)
            time.sleep(0.5)
            assert stranger.poll() is None  # never signalled
        finally:
            runner.stop(cancel_running=True)
            store.close()
    finally:
        stranger.kill()
        stranger.wait()


def test_a_run_without_its_folder_or_its_result_fails_and_the_queue_moves_on(tmp_path, tiny_model_dir, monkeypatch):
    store = Store(tmp_path / "queue.duckdb")
    seed_preferences(store, 8)
    runner = runner_for(store, tmp_path, tiny_model_dir)
    try:
        with store.transaction() as cur:  # the app was killed between committing the row and writing its folder
            cur.execute(
                "INSERT INTO training_runs (id, method, status, created_at) "
                "VALUES (nextval('training_runs_id_seq'), 'dpo', 'queued', now())"
            )

        def disk_full(*_args, **_kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(runner_module.yaml, "safe_dump", disk_full)  # run.yaml, after the data snapshot
        with pytest.raises(RunRejected, match="No space left on device"):
            runner.submit("dpo", QUICK_RUN)
        runner.tick()  # the runner thread's next look at the queue
        assert [runner.status(i).status for i in (1, 2)] == ["failed", "failed"]
        assert "never completed" in runner.status(1).error and "No space left" in runner.status(2).error
        monkeypatch.undo()

        def cannot_record(*_args, **_kwargs):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(runner_module, "register_version", cannot_record)
        first = runner.submit("dpo", QUICK_RUN)
        second = runner.submit("dpo", QUICK_RUN)  # waits behind the first
        ended = runner.wait(first, timeout=300)
        assert ended.status == "failed" and "recording it failed" in ended.error and "Input/output" in ended.error
        monkeypatch.undo()
        assert runner.wait(second, timeout=300).status == "succeeded"
    finally:
        runner.stop(cancel_running=True)
        store.close()

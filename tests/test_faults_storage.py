"""Faults at the DuckDB boundary (issue 11): a failing COMMIT/ROLLBACK must not stall every later write, and a
database that cannot be opened (read-only path, locked by another process, full disk) is one line at start."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from storage import commit
from storage.db import Store
from tests.apphelpers import free_port

REPO = Path(__file__).resolve().parent.parent


class FlakyConnection:
    """The store's connection, except that the next `commits` COMMITs fail like a full disk (DuckDB rolls the
    transaction back, unless `keep_open`) and the next `rollbacks` ROLLBACKs raise too."""

    def __init__(self, con, commits: int = 1, rollbacks: int = 1, keep_open: bool = False):
        self.con, self.commits, self.rollbacks, self.keep_open = con, commits, rollbacks, keep_open
        self.injected = 0

    def cursor(self):
        return FlakyCursor(self, self.con.cursor())

    def __getattr__(self, name):
        return getattr(self.con, name)


class FlakyCursor:
    def __init__(self, owner: FlakyConnection, cur):
        self.owner, self.cur = owner, cur

    def execute(self, sql, *args):
        owner = self.owner
        if sql == "COMMIT" and owner.commits > 0:
            owner.commits -= 1
            owner.injected += 1
            if not owner.keep_open:
                self.cur.execute("ROLLBACK")
            raise duckdb.IOException("injected: could not write the WAL: No space left on device")
        if sql == "ROLLBACK" and owner.rollbacks > 0:
            owner.rollbacks -= 1
            owner.injected += 1
            raise duckdb.TransactionException("injected: cannot rollback")
        self.cur.execute(sql, *args)
        return self

    def __getattr__(self, name):
        return getattr(self.cur, name)


def concurrent_writes(store: Store, count: int, timeout: float = 5.0) -> list[tuple[str, float, object]]:
    """`count` threads each add one prompt (and every other one a vote, which joins the multi-row INSERT).
    Returns (outcome 'ok'|'error'|'hung', seconds, value) per thread."""
    results: list = [("hung", timeout, None)] * count
    start = threading.Barrier(count)

    def one(i: int) -> None:
        start.wait()
        began = time.monotonic()
        try:
            if i % 2:
                vote = {"prompt_id": 1, "generation_a": 1, "generation_b": 2, "choice": "A"}
                value = store.add_comparison(annotator=f"w{i}", **vote)
            else:
                value = store.add_prompt(f"prompt from writer {i}", "test")
            results[i] = ("ok", time.monotonic() - began, value)
        except Exception as exc:
            results[i] = ("error", time.monotonic() - began, exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results


def stored_counts(store: Store) -> tuple[int, int]:
    with store.read() as cur:
        prompts = cur.execute("SELECT count(*) FROM prompts WHERE text LIKE 'prompt from writer %'").fetchone()[0]
        votes = cur.execute("SELECT count(*) FROM comparisons").fetchone()[0]
    return prompts, votes


@pytest.mark.parametrize("keep_open", [False, True], ids=["commit-rolled-back", "commit-left-open"])
def test_a_failed_commit_and_rollback_do_not_stall_later_writes(tmp_path, keep_open):
    store = Store(tmp_path / "flaky.duckdb")
    try:
        flaky = FlakyConnection(store._con, commits=1, rollbacks=1, keep_open=keep_open)
        store._con = flaky
        results = concurrent_writes(store, 8)
        assert flaky.injected == 2
        assert all(outcome != "hung" for outcome, _, _ in results), results  # the old committer died here
        assert max(seconds for _, seconds, _ in results) < 1.0
        ok = [r for r in results if r[0] == "ok"]
        assert len(ok) == 8  # the failed batch was retried write by write, and the retries committed
        assert stored_counts(store) == (4, 4)  # nothing twice, nothing lost
        assert store.add_prompt("a later write", "test") > 0
    finally:
        store.close()


def test_a_disk_that_stays_full_answers_every_writer_and_recovers(tmp_path):
    store = Store(tmp_path / "full.duckdb")
    try:
        flaky = FlakyConnection(store._con, commits=10_000, rollbacks=10_000)
        store._con = flaky
        results = concurrent_writes(store, 8)
        assert [outcome for outcome, _, _ in results] == ["error"] * 8
        assert max(seconds for _, seconds, _ in results) < 1.0
        assert all("No space left on device" in str(value) for _, _, value in results)
        assert stored_counts(store) == (0, 0)
        flaky.commits = flaky.rollbacks = 0  # space was freed
        assert store.add_prompt("after the disk was freed", "test") > 0
        assert [outcome for outcome, _, _ in concurrent_writes(store, 4)] == ["ok"] * 4
    finally:
        store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_writers_hear_within_a_second_when_the_committer_dies_and_a_new_one_takes_over(tmp_path, monkeypatch):
    store = Store(tmp_path / "dies.duckdb")
    real = commit.GroupCommit._run_batch
    deaths = []

    def dies_once(self, batch):
        if not deaths:
            deaths.append(len(batch))
            raise SystemExit("the committer thread ends")  # not an Exception: nothing in the loop catches it
        return real(self, batch)

    monkeypatch.setattr(commit.GroupCommit, "_run_batch", dies_once)
    try:
        results = concurrent_writes(store, 6)
        assert all(outcome != "hung" for outcome, _, _ in results), results
        assert max(seconds for _, seconds, _ in results) < 1.0
        failed = [value for outcome, _, value in results if outcome == "error"]
        assert len(failed) == deaths[0] and all(isinstance(v, commit.CommitterStopped) for v in failed)
        assert store.add_prompt("after a new committer started", "test") > 0
        assert store._commits.restarts == 1
    finally:
        store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_write_arriving_after_the_committer_died_answers_the_writes_it_held(tmp_path, monkeypatch):
    """The race CI hit: a new write started a new committer before any waiting writer noticed the death, and the
    writes the dead committer held waited forever."""
    store = Store(tmp_path / "dies-late.duckdb")
    real, died = commit.GroupCommit._run_batch, threading.Event()

    def dies_once(self, batch):
        if not died.is_set():
            died.set()
            raise SystemExit("the committer thread ends")
        return real(self, batch)

    monkeypatch.setattr(commit.GroupCommit, "_run_batch", dies_once)
    monkeypatch.setattr(commit, "CHECK_SECONDS", 30)  # the held writer would look again only this late
    outcome: dict = {}

    def held() -> None:
        try:
            outcome["held"] = store.add_prompt("held by the committer that dies", "test")
        except commit.CommitterStopped as exc:
            outcome["held"] = exc

    writer = threading.Thread(target=held)
    writer.start()
    try:
        assert died.wait(5)
        deadline = time.monotonic() + 5
        while store._commits._thread.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        began = time.monotonic()
        assert store.add_prompt("arrives after the death", "test") > 0
        writer.join(5)
        assert isinstance(outcome.get("held"), commit.CommitterStopped), outcome
        assert time.monotonic() - began < 1.0 and store._commits.restarts == 1
    finally:
        store.close()


# ---- a database that cannot be opened: one line at start ------------------------------------------------------
@contextlib.contextmanager
def read_only_dir(path: Path):
    """A folder nobody can write into, root included (chattr +i when running as root)."""
    path.mkdir()
    path.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr")
    if immutable and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only folder as root here (chattr +i refused)")
    try:
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=False)
        path.chmod(0o755)


def start_app(db: Path, tmp_path: Path, preexec=None) -> subprocess.Popen:
    cmd = [sys.executable, "app.py", "--db", str(db), "--port", str(free_port()), "--runs-dir", str(tmp_path / "runs")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec)  # fmt: skip


def small_file_limit() -> None:
    """In the child: files may not grow past 4 KiB, as if the disk were full (writes fail, Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_an_unusable_database_is_one_error_line_at_start(tmp_path):
    locked = tmp_path / "locked.duckdb"
    holder = duckdb.connect(str(locked))  # another process (this one) holds the file
    try:
        with read_only_dir(tmp_path / "ro") as ro:
            apps = {
                "read-only": start_app(ro / "app.duckdb", tmp_path),
                "locked": start_app(locked, tmp_path),
                "full": start_app(tmp_path / "full" / "app.duckdb", tmp_path, preexec=small_file_limit),
            }
            outcomes = {name: app.communicate(timeout=180) for name, app in apps.items()}
    finally:
        holder.close()
    expected = {
        "read-only": "the path is not writable",
        "locked": f"in use by another process (PID {os.getpid()})",
        "full": "no room to write it",
    }
    for name, (stdout, stderr) in outcomes.items():
        assert apps[name].returncode != 0, (name, stdout, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot open the database "), (name, stderr)
        assert expected[name] in lines[0], (name, lines[0])

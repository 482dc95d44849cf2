"""Two app processes on one PostgreSQL database, 16 clients split across them (issue 14, "out"): no pair is leased
twice, no vote is lost or stored twice (a retried vote through the other process gets the same id), and the
training queue runs one run at a time for the whole store. Real processes, a real PostgreSQL server, no mocks."""

from __future__ import annotations

import threading
import time

import pytest

from generation.engine import GenerationEngine
from generation.sampling import SamplingParams
from labeling.pair_queue import PairQueue
from storage.db import Store
from tests.apprun import app_process
from tests.datahelpers import QUICK_RUN, seed_preferences
from training.runner import JobRunner

pytestmark = pytest.mark.slow

CLIENTS = 16
VOTES_EACH = 3
PAIRS = CLIENTS * VOTES_EACH + 8  # a few spare: the last clients must still find pairs


def prepare(url: str, model_dir) -> None:
    """Prompts and PAIRS ready pairs, made here (the apps then only lease and take votes: --queue-size 0)."""
    store = Store(url)
    engine = GenerationEngine(str(model_dir), max_batch=16)
    try:
        for i in range(PAIRS):
            store.add_prompt(f"Question {i}: what is {i} times {i + 1}?", "test")
        assert PairQueue(store, engine, params=SamplingParams(max_new_tokens=4)).generate_pairs(PAIRS) == PAIRS
    finally:
        engine.close()
        store.close()


def test_two_app_processes_share_one_postgres_store(pg_server, tmp_path, tiny_model_dir):
    from gradio_client import Client

    url = pg_server.new_database()
    prepare(url, tiny_model_dir)
    common = ["--db", url, "--queue-size", "0", "--runs-dir", str(tmp_path / "runs")]
    with (
        app_process(tmp_path, tiny_model_dir, *common, name="app1") as app1,
        app_process(tmp_path, tiny_model_dir, *common, name="app2") as app2,
    ):
        leases: list[tuple[int, str]] = []  # (pair, client) of every lease handed out, by either process
        votes: dict[int, tuple[str, str]] = {}  # pair -> (client, choice) acknowledged
        errors: list[BaseException] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            name, choice = f"c{k:02d}", ("A", "B", "tie", "both_bad")[k % 4]
            try:
                api = Client((app1, app2)[k % 2].url, verbose=False)  # half the clients on each process
                while sum(1 for who, _ in votes.values() if who == name) < VOTES_EACH:
                    pair_id, *_ = api.predict(name, api_name="/next_pair")
                    assert pair_id is not None, "the shared queue ran dry"
                    with lock:
                        leases.append((int(pair_id), name))
                    assert api.predict(pair_id, name, choice, "", "", api_name="/vote") == "ok"
                    with lock:
                        votes[int(pair_id)] = (name, choice)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        assert len(leases) == len({pair for pair, _ in leases}) == CLIENTS * VOTES_EACH  # never leased twice

        # A vote retried through the other process (its answer was lost): acknowledged again, stored once.
        pair_id, (name, choice) = next(iter(votes.items()))
        k = int(name[1:])
        retry = Client((app2, app1)[k % 2].url, verbose=False)
        assert retry.predict(pair_id, name, choice, "", "", api_name="/vote") == "ok"
        with pytest.raises(Exception, match="already judged"):  # a different vote on it is still refused
            retry.predict(pair_id, name, "tie" if choice != "tie" else "A", "", "", api_name="/vote")

        store = Store(url)
        try:
            with store.read() as cur:
                stored = cur.execute("SELECT pair_id, annotator, choice FROM comparisons").fetchall()
                statuses = dict(cur.execute("SELECT status, count(*) FROM pairs GROUP BY 1").fetchall())
            assert sorted(stored) == sorted((pair, who, what) for pair, (who, what) in votes.items())  # none lost
            assert statuses == {"done": CLIENTS * VOTES_EACH, "ready": PAIRS - CLIENTS * VOTES_EACH}
            one_run_at_a_time(store, tmp_path, tiny_model_dir)
        finally:
            store.close()
        assert app1.terminate() in (0, 143) and app2.terminate() in (0, 143)


def one_run_at_a_time(store, tmp_path, model_dir) -> None:
    """Two runs queued from a third process (like a third replica): whichever app process holds the runner lock
    starts them, one after the other; the store never has two running."""
    seed_preferences(store, 12)
    runner = JobRunner(store, runs_dir=tmp_path / "runs", base_model=str(model_dir), model_cache=tmp_path / "cache")
    assert not store.hold_lock("runner")  # an app process took it at its start
    first, second = runner.submit("dpo", QUICK_RUN), runner.submit("dpo", QUICK_RUN)
    most_running, deadline = 0, time.monotonic() + 600
    while True:
        with store.read() as cur:
            sql = "SELECT id, status FROM training_runs WHERE id IN (?, ?)"
            rows = dict(cur.execute(sql, [first, second]).fetchall())
        most_running = max(most_running, sum(1 for status in rows.values() if status == "running"))
        if all(status in ("succeeded", "failed", "cancelled") for status in rows.values()):
            break
        assert time.monotonic() < deadline, f"runs did not end: {rows}"
        time.sleep(0.1)
    assert rows == {first: "succeeded", second: "succeeded"}
    assert most_running == 1
    with store.read() as cur:
        started = cur.execute("SELECT started_at FROM training_runs ORDER BY id").fetchall()
        finished = cur.execute("SELECT finished_at FROM training_runs ORDER BY id").fetchall()
    assert started[1][0] >= finished[0][0]  # the second began after the first ended

"""The Combiner shares one transaction among concurrent callers; one caller's bad request must not fail the rest."""

from __future__ import annotations

import threading
import time

from labeling.combiner import Combiner
from storage.db import Store


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_request_the_store_refuses_fails_its_caller_only(tmp_path):
    """Three requests share a batch; DuckDB refuses one (a lone surrogate, which UTF-8 cannot hold), so the batch's
    transaction rolls back: the other two are run again alone and stored, and only the bad one's caller hears it."""
    store = Store(tmp_path / "notes.duckdb")
    with store.transaction() as cur:
        cur.execute("CREATE TABLE notes (text VARCHAR)")
    gate = threading.Event()

    def batch(items: list[str]) -> list[str]:
        if items == ["first"]:
            gate.wait(10)  # holds the lead until the others have queued up behind it: they then share one batch
        with store.transaction() as cur:
            for item in items:
                cur.execute("INSERT INTO notes VALUES (?)", [item])
        return [f"stored {item!r}" for item in items]

    combiner, results = Combiner(batch), {}

    def call(item: str) -> None:
        try:
            results[item] = combiner.run(item)
        except Exception as exc:
            results[item] = exc

    bad = "bad \ud800"
    threads = [threading.Thread(target=call, args=("first",))]
    threads[0].start()
    wait_until(lambda: combiner._busy)
    threads += [threading.Thread(target=call, args=(item,)) for item in ("a", bad, "b")]
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: len(combiner._waiting) == 3)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert results["first"] == "stored 'first'" and results["a"] == "stored 'a'" and results["b"] == "stored 'b'"
    assert isinstance(results[bad], Exception)
    with store.read() as cur:
        assert sorted(row[0] for row in cur.execute("SELECT text FROM notes").fetchall()) == ["a", "b", "first"]
    store.close()

"""The Combiner shares one transaction among concurrent callers; one caller's bad request must not fail the rest, nor
leave the lease desk believing what the rolled-back transaction wrote."""

from __future__ import annotations

import threading
import time

import pytest

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


def desk_with_pairs(path, count: int):
    """A store at `path` with `count` ready pairs of one prompt, and a lease desk on it."""
    from datetime import timedelta

    from labeling.pair_leases import LeaseDesk

    store = Store(path)
    prompt = store.add_prompt([{"role": "user", "content": "Name a colour."}], "test")
    for _ in range(count):
        a = store.add_generation(prompt, "Blue.", model_name="m")
        b = store.add_generation(prompt, "Red.", model_name="m")
        with store.transaction() as cur:
            cur.execute(
                "INSERT INTO pairs (id, prompt_id, strategy, generation_a, generation_b) "
                "VALUES (nextval('pairs_id_seq'), ?, 'self', ?, ?)",
                [prompt, a, b],
            )
    return store, LeaseDesk(store, timedelta(minutes=10))


def test_a_batch_the_store_refused_forgets_the_names_it_would_have_added(tmp_path):
    """The lease desk caches who is in the annotators table; a batch whose transaction rolled back must not leave
    its new names in that cache, or the same vote, run again alone, is stored without its annotator row."""
    from labeling.pair_leases import Vote

    store, desk = desk_with_pairs(tmp_path / "desk.duckdb", 2)
    good = Vote(desk.lease_pair("erin")["pair_id"], "erin", "A", None, None, 2.0)
    with pytest.raises(Exception):  # noqa: B017  (DuckDB's own error type: the store refuses the batch whole)
        # as the Combiner runs a batch: erin's vote is inserted first, then a lease for a name the store cannot
        # hold (past the edge's checks, as a bug might let one) fails the rest of the transaction
        desk._run_requests([good, "finn \ud800"])
    assert isinstance(desk._run_requests([good])[0], int)  # run again alone, as the Combiner does
    with store.read() as cur:
        assert cur.execute("SELECT annotator FROM comparisons").fetchall() == [("erin",)]
        assert ("erin",) in cur.execute("SELECT name FROM annotators").fetchall()
    store.close()


def test_a_vote_repeated_in_one_batch_or_a_retried_skip_gets_the_first_ones_id(tmp_path):
    """A double click whose two votes share a batch answered the second with "already judged" (a retry in a later
    batch got the first id), and a retried skip was refused: the pair had gone back to the others."""
    from labeling.pair_leases import Vote

    store, desk = desk_with_pairs(tmp_path / "desk.duckdb", 2)
    vote = Vote(desk.lease_pair("erin")["pair_id"], "erin", "A", "clearer", None, 2.0)
    first, second = desk._run_requests([vote, vote])  # as the Combiner runs two callers' requests together
    assert isinstance(first, int) and second == first
    assert desk.vote(vote.pair_id, "erin", "A", "clearer") == first  # and in a later batch, as before
    skipped = desk.lease_pair("erin")["pair_id"]
    skip = desk.vote(skipped, "erin", "skip")
    assert desk.vote(skipped, "erin", "skip") == skip
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM comparisons").fetchone()[0] == 2
    store.close()


def crowd_batches(linger: float, kind=None, callers: int = 8, calls: int = 12, out_of_step: bool = False) -> list:
    """Callers that each run `calls` requests back to back (as people lease, vote, lease ...): the items of each
    batch, (caller, call number). `out_of_step`: half the callers start at call 1 (a vote while the others lease)."""
    batches: list[list[tuple[int, int]]] = []

    def batch(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
        batches.append(items)
        time.sleep(0.005)  # a transaction's worth of work, during which the others queue up
        return items

    combiner, start = Combiner(batch, linger=linger, kind=kind), threading.Barrier(callers)

    def call(number: int) -> None:
        start.wait()
        for step in range(calls):
            step += int(out_of_step and number % 2)
            assert combiner.run((number, step)) == (number, step)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(item for items in batches for item in items) == [
        (n, step + int(out_of_step and n % 2)) for n in range(callers) for step in range(calls)
    ]  # every request answered, each once
    return batches


def mean_size(batches: list[list]) -> float:
    later = batches[2:]  # after the start
    return sum(len(items) for items in later) / len(later)


def test_a_crowd_keeps_sharing_one_batch_and_a_lone_caller_never_waits():
    """Callers that come straight back split into groups taking turns (each request then waits for two batches)
    unless the new leader lingers for the rest of the last batch (without it: batches of 1 and 7 taking turns); a
    caller alone must not pay that linger."""
    assert mean_size(crowd_batches(linger=0.0)) < 6  # groups taking turns: what the linger is for
    assert mean_size(crowd_batches(linger=0.05)) >= 7.5  # all 8 in (nearly) every batch; 50 ms: a busy machine

    combiner = Combiner(lambda items: items, linger=1.0)
    began = time.monotonic()
    assert [combiner.run(n) for n in range(5)] == list(range(5))
    assert time.monotonic() - began < 1.0  # a last batch of one: nobody else to wait for


def test_callers_alternating_two_kinds_settle_into_batches_of_one_kind():
    """Leases and votes: a batch of one kind costs less than a mixed one. Half the crowd votes while the other half
    leases: without `kind` every batch stays mixed; with it, a batch takes the oldest waiting item's kind only, and
    the leader lingers for the callers it just answered, so the crowd settles into whole batches of one kind."""

    def odd(item: tuple[int, int]) -> bool:
        return item[1] % 2 == 1

    mixed = crowd_batches(linger=0.05, out_of_step=True)
    assert sum(len({odd(item) for item in items}) > 1 for items in mixed) >= len(mixed) - 3  # mixed all along
    settled = crowd_batches(linger=0.05, kind=odd, out_of_step=True)
    assert all(len({odd(item) for item in items}) == 1 for items in settled)  # never mixed
    assert all(len(items) == 8 for items in settled[3:-2])  # and whole: everyone in each, once settled

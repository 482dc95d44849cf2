"""Faults in the pair queue (issue 11): skips that starve the person who made them, undo after a skip, and one
over-long prompt that stopped every refill. Real DuckDB files and the tiny random Llama."""

from __future__ import annotations

import time

import pytest

from generation.sampling import SamplingParams
from labeling.pair_queue import PairQueue
from storage.db import Store

QUICK = SamplingParams(max_new_tokens=6)


@pytest.fixture
def store(db_url):
    store = Store(db_url)
    for i in range(8):
        store.add_prompt(f"Question number {i}?", "test")
    yield store
    store.close()


def rows(store, sql: str, params=None) -> list[tuple]:
    with store.read() as cur:
        return cur.execute(sql, params or []).fetchall()


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s")


def test_a_person_who_skipped_everything_gets_new_pairs(store, engine):
    """Queue size 2: skipped pairs stay 'ready' for others, so they filled the target and the person who skipped
    them waited for "pairs are being generated" forever."""
    queue = PairQueue(store, engine, target=2, params=QUICK)
    queue.start()
    try:
        wait_for(lambda: queue.depth() == 2)
        skipped = []
        for _ in range(4):
            pair = wait_for(lambda: queue.next_pair("alice"), timeout=30)
            queue.record_vote(pair["pair_id"], "alice", "skip")
            skipped.append(pair["pair_id"])
        assert len(set(skipped)) == 4
        fresh = wait_for(lambda: queue.next_pair("alice"), timeout=30)
        assert fresh["pair_id"] not in skipped
        # the skipped ones still wait for others, and the refill tops up what alice has left (she holds `fresh`; the
        # refill may still be generating the pair after it: asserted at once, this failed once in CI under load)
        wait_for(lambda: queue.depth() >= 5)
        assert queue.depth("alice") >= 1
        assert queue.next_pair("bob")["pair_id"] == skipped[0]  # others get the skipped pairs, oldest first
    finally:
        queue.stop()


def test_own_pairs_count_only_for_their_author(store, engine):
    queue = PairQueue(store, engine, target=1, params=QUICK, lease_minutes=0.5)
    stream = engine.stream_pair([{"role": "user", "content": "Mine"}], *queue.pair_params(), 0, 0)
    list(stream)
    own = queue.add_own_pair("alice", [{"role": "user", "content": "Mine"}], *stream.result)
    with store.transaction() as cur:  # alice let the lease on her own pair run out
        cur.execute("UPDATE pairs SET lease_expires = lease_expires - INTERVAL '31 seconds'")
    assert queue.depth() == 0 and queue.progress()["ready"] == 0  # nobody else can be given it
    assert queue.depth("alice") == 1
    queue.start()
    try:
        bob = wait_for(lambda: queue.next_pair("bob"))  # the refill did not count alice's pair as bob's
        assert bob["strategy"] == "self"
        assert queue.next_pair("alice")["pair_id"] == own["pair_id"]
    finally:
        queue.stop()


def test_undo_after_a_skip_undoes_the_skip_and_shows_that_pair_next(store, engine):
    queue = PairQueue(store, engine, params=QUICK)
    queue.generate_pairs(4)
    first = queue.next_pair("alice")
    voted = queue.record_vote(first["pair_id"], "alice", "A")
    second = queue.next_pair("alice")
    skip = queue.record_vote(second["pair_id"], "alice", "skip")
    on_screen = queue.next_pair("alice")

    assert queue.undo_last("alice") == skip  # the latest action, not the vote before it
    assert rows(store, "SELECT choice FROM effective_comparisons WHERE annotator = 'alice'") == [("A",)]
    assert queue.next_pair("alice")["pair_id"] == second["pair_id"]  # the skipped pair is back, shown next
    assert queue.next_pair("bob")["pair_id"] not in (second["pair_id"], on_screen["pair_id"])
    queue.record_vote(second["pair_id"], "alice", "B")
    assert queue.next_pair("alice")["pair_id"] == on_screen["pair_id"]  # the pair that was on screen waited

    assert queue.undo_last("alice") not in (None, voted)  # the B vote just cast
    assert queue.next_pair("alice")["pair_id"] == second["pair_id"]  # again the undone pair first
    assert rows(store, "SELECT choice FROM effective_comparisons WHERE annotator = 'alice'") == [("A",)]


def test_undo_of_a_skip_whose_pair_went_to_someone_else(store, engine):
    queue = PairQueue(store, engine, params=QUICK)
    queue.generate_pairs(2)
    pair = queue.next_pair("alice")
    skip = queue.record_vote(pair["pair_id"], "alice", "skip")
    assert queue.next_pair("bob")["pair_id"] == pair["pair_id"]
    assert queue.undo_last("alice") == skip  # the skip is undone, the pair stays with bob
    assert queue.lease_holder(pair["pair_id"]) == "bob"
    assert queue.record_vote(pair["pair_id"], "bob", "tie") > 0


def test_an_over_long_prompt_is_cut_to_fit_and_the_queue_fills(store, engine):
    """A 50,000-character prompt raised inside the refill, lost the requests already submitted, and was picked first
    again on every round: the queue never filled."""
    long_id = store.add_prompt("word " * 10_000 + "So, what is the last word?", "test")
    others = [pid for (pid,) in rows(store, "SELECT id FROM prompts WHERE id <> ?", [long_id])]
    for pid in others:  # every other prompt was judged once: the long one is picked first on every round
        gen = store.add_generation(pid, "x", model_version_id=0)
        store.add_comparison(prompt_id=pid, generation_a=gen, generation_b=gen, annotator="old", choice="tie")
    queue = PairQueue(store, engine, target=4, params=QUICK)
    queue.start()
    try:
        wait_for(lambda: queue.depth() >= 4, timeout=60)
    finally:
        queue.stop()
    assert rows(store, "SELECT count(*) FROM pairs WHERE prompt_id = ?", [long_id]) == [(1,)]
    assert queue.unusable == {}
    fitted = engine.fit([{"role": "user", "content": "word " * 10_000 + "the end?"}], QUICK.max_new_tokens)
    assert fitted[-1]["content"].endswith("the end?") and fitted[-1]["content"].startswith("…")
    assert len(engine.encode(fitted)) + QUICK.max_new_tokens <= engine.context


def test_a_prompt_that_cannot_fit_is_set_aside_with_its_reason(store, engine):
    huge_system = [{"role": "system", "content": "rule " * 2_000}, {"role": "user", "content": "Hi"}]
    bad_id = store.add_prompt(huge_system, "test")
    assert engine.fit(huge_system, QUICK.max_new_tokens) is None
    # one pair more than the good prompts give in a round: ties are broken at random, so a target they could meet
    # alone might be met before the bad prompt was ever tried; past it, the prompt with no pair sorts first
    queue = PairQueue(store, engine, target=len(rows(store, "SELECT id FROM prompts")), params=QUICK)
    queue.start()
    try:
        wait_for(lambda: bad_id in queue.unusable, timeout=60)
    finally:
        queue.stop()
    assert list(queue.unusable) == [bad_id] and "cannot be cut to fit" in queue.unusable[bad_id]
    assert rows(store, "SELECT count(*) FROM pairs WHERE prompt_id = ?", [bad_id]) == [(0,)]

"""Pairs of a version no longer served: retired at the switch, and by the refill's sweep when they come back."""

from __future__ import annotations

from datetime import datetime, timedelta

from labeling.pair_leases import utc_now
from labeling.pair_queue import PairQueue
from tests import test_pair_queue
from tests.test_engine import make_adapter
from tests.test_pair_queue import QUICK, rows

store = test_pair_queue.store  # the fixture: a store on each backend, with six prompts


def switch_version(store, engine, queue, model_dir, tmp_path, base_model: str) -> int:
    """A new version (an adapter on the tiny model, recorded with `base_model`) made the serving one; its id."""
    adapter = make_adapter(model_dir, tmp_path / "v1")
    version = store.add_version(base_model=base_model, adapter_path=str(adapter), parent_id=0)
    engine.load_version(version, adapter)
    engine.set_active(version)
    queue.on_version_change(version)
    return version


def test_a_new_version_retires_old_self_pairs(store, engine, tiny_model_dir, tmp_path):
    queue = PairQueue(store, engine, params=QUICK)
    queue.generate_pairs(3)
    leased = queue.next_pair("alice")
    expired = queue.next_pair("carol")["pair_id"]
    with store.transaction() as cur:  # carol left: her lease ran out, so the pair is anyone's again
        cur.execute("UPDATE pairs SET lease_expires = ? WHERE id = ?", [datetime(2000, 1, 1), expired])
    version = switch_version(store, engine, queue, tiny_model_dir, tmp_path, str(tiny_model_dir))
    assert rows(store, "SELECT status, count(*) FROM pairs GROUP BY 1 ORDER BY 1") == [("leased", 1), ("retired", 2)]
    assert rows(store, "SELECT status FROM pairs WHERE id = ?", [expired]) == [("retired",)]  # an expired lease too
    queue.generate_pairs(1)
    assert queue.next_pair("bob")["version_a"] == version
    assert queue.next_pair("alice") == leased  # a pair already on someone's screen stays theirs


def test_an_old_pair_whose_lease_ran_out_after_a_version_change_is_retired(store, engine, tiny_model_dir, tmp_path):
    """A version switch leaves a running lease with its annotator; when that lease runs out the pair (of the old
    version) must not go to someone else: the refill's sweep retires it."""
    queue = PairQueue(store, engine, params=QUICK)
    queue.generate_pairs(2)
    held = queue.next_pair("alice")
    version = switch_version(store, engine, queue, tiny_model_dir, tmp_path, "tiny")
    statuses = dict(rows(store, "SELECT id, status FROM pairs"))
    assert statuses[held["pair_id"]] == "leased" and sorted(statuses.values()) == ["leased", "retired"]
    store.write(lambda c: c.execute("UPDATE pairs SET lease_expires = ? WHERE id = ?",
                                    [utc_now() - timedelta(seconds=1), held["pair_id"]]))  # fmt: skip
    assert queue.retire_stale(version, only_expired=True) == 1
    assert queue.next_pair("bob") is None


def test_an_old_pair_skipped_after_a_version_change_is_retired_by_the_sweep(store, engine, tiny_model_dir, tmp_path):
    queue = PairQueue(store, engine, params=QUICK)
    queue.generate_pairs(1)
    held = queue.next_pair("alice")
    version = switch_version(store, engine, queue, tiny_model_dir, tmp_path, "tiny")
    queue.record_vote(held["pair_id"], "alice", "skip")  # back to ready for others, from the old version
    assert queue.retire_stale(version) == 1 and queue.next_pair("bob") is None

"""Which pairs are out of date: the one rule, in Python for a pair being stored and in SQL for the stored ones.

A 'self' pair is current while the version that wrote it serves. A 'versions' pair (the arena, labeling/arena.py) is
current while one side is a candidate still waiting and the other the serving version or the base (version 0) —
the gate judges a candidate against both. An 'endpoint' pair is current while one side is the serving version.
Pairs of other strategies ('own', 'import') never go out of date. An out-of-date pair still available is
'retired': nobody is given it any more (one leased and not expired stays with its annotator until the lease ends).
"""

from __future__ import annotations

from datetime import datetime

from labeling.pair_leases import AVAILABLE

EXPIRED_LEASE = "(status = 'leased' AND lease_expires <= ?)"


def is_stale(strategy: str, versions: list[int], serving: int, candidates: set[int]) -> bool:
    """Is a pair of `strategy` whose answers came from `versions` out of date?"""
    if strategy == "self":
        return versions[0] != serving
    if strategy == "versions":
        waiting = candidates - {serving}
        return not (set(versions) <= waiting | {serving, 0} and set(versions) & waiting)
    if strategy == "endpoint":
        return serving not in versions
    return False


def waiting_candidates(cur) -> set[int]:
    """The ids of the candidate versions, read in the caller's transaction."""
    return {int(r[0]) for r in cur.execute("SELECT id FROM model_versions WHERE status = 'candidate'").fetchall()}


def retire_stale(cur, serving: int, now: datetime, only_expired: bool = False) -> int:
    """Retire the available pairs (or only those whose lease expired) that `is_stale` would call out of date; how
    many. The versions of a pair's answers are looked up by id, pair by pair."""
    waiting = sorted(waiting_candidates(cur) - {serving})
    sides = "SELECT 1 FROM generations g WHERE g.id IN (pairs.generation_a, pairs.generation_b) AND"
    cur.execute(
        f"""UPDATE pairs SET status = 'retired' WHERE {EXPIRED_LEASE if only_expired else AVAILABLE} AND (
              (strategy = 'self' AND NOT EXISTS (SELECT 1 FROM generations g WHERE g.id = pairs.generation_a
                                                  AND g.model_version_id = ?))
           OR (strategy = 'versions' AND (EXISTS ({sides} NOT coalesce(g.model_version_id, -1) = ANY(?::INTEGER[]))
                                          OR NOT EXISTS ({sides} g.model_version_id = ANY(?::INTEGER[]))))
           OR (strategy = 'endpoint' AND NOT EXISTS ({sides} g.model_version_id = ?)))
           RETURNING id""",
        [now, serving, [*waiting, serving, 0], waiting, serving],
    )
    return len(cur.fetchall())

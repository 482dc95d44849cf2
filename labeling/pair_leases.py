"""Leases and votes for the pair queue, many per transaction.

Many people ask for pairs and vote at the same moment. Each such request waits in a `Combiner`; one caller at a time
handles every waiting request in one transaction of a few set-based statements (a DuckDB commit costs ≈ 4 ms and a
statement ≈ 1 ms here, so 16 callers served one by one would wait 60+ ms; together they wait ≈ 10 ms).
Lease times are naive UTC timestamps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from labeling.combiner import Combiner
from storage.db import annotator_name, check_judgement, insert_comparisons

AVAILABLE = "(status = 'ready' OR (status = 'leased' AND lease_expires <= ?))"  # a pair someone may be given
# a lease candidate's columns: what the choice needs, then what the page needs (LeaseDesk.views)
CANDIDATE = "id, status, leased_to, lease_expires, strategy, prompt_id, generation_a, generation_b"


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class Vote:
    pair_id: int
    annotator: str
    choice: str
    rationale: str | None
    edited_answer: str | None
    time_spent_s: float | None


class LeaseDesk:
    """Hands out pairs (`lease_pair`), takes votes (`vote`) and reads what a page shows of a pair (`views`)."""

    def __init__(self, store, lease: timedelta):
        self.store, self.lease = store, lease
        # leases and votes, many per transaction; a batch of one kind (at 1M, 16 callers flat out: 16 leases 10 ms,
        # 16 votes 7 ms, 8 of each 15 ms: each kind has its own few statements)
        self._requests = Combiner(self._run_requests, kind=lambda request: isinstance(request, Vote))
        self._known_annotators: set[str] = set()  # already in the annotators table
        self._asked: dict[str, float] = {}  # who asked for a pair lately (monotonic time): the refill serves them

    def lease_pair(self, annotator: str) -> dict | None:
        """The pair this person holds (unexpired, the latest leased first), else the oldest available pair they
        never judged or skipped, now leased to them; None when there is none."""
        name = annotator_name(annotator)
        self._asked[name] = time.monotonic()
        return self._requests.run(name)

    def available(
        self, strategies: tuple[str, ...] | None = None, names: list[str] | None = None, anyone: bool = True
    ) -> dict:
        """How many pairs (of `strategies`, default all) could be given now: {None: to anyone (no 'own' pairs),
        name: to that person (pairs they judged or skipped do not count; held ones and their own ones do)}.
        `names` defaults to everyone who asked for a pair within a lease period; `anyone=False` leaves out None."""
        if names is None:
            recent = time.monotonic() - self.lease.total_seconds()
            self._asked = {n: t for n, t in list(self._asked.items()) if t >= recent}
            names = list(self._asked)
        now = utc_now()
        kinds, kind_args = ("TRUE", []) if strategies is None else ("p.strategy = ANY(?)", [list(strategies)])
        with self.store.read() as cur:
            sql = f"SELECT count(*) FROM pairs p WHERE {AVAILABLE} AND p.strategy <> 'own' AND {kinds}"
            shared = cur.execute(sql, [now, *kind_args]).fetchone()[0]  # what anyone may be given
            counts: dict = {None: shared} if anyone else {}
            if not names:
                return counts
            # Per name: the shared pairs less those they judged or skipped, plus what is theirs alone. Counted here:
            # one statement with a per-name NOT EXISTS took 8 ms a vote on the Label tab, mostly DuckDB's planner.
            theirs = cur.execute(
                "SELECT id, status, leased_to, lease_expires, strategy FROM pairs p "
                f"WHERE status IN ('ready', 'leased') AND leased_to = ANY(?) AND {kinds}",
                [names, *kind_args],
            ).fetchall()
            judged = cur.execute(
                "SELECT c.pair_id, c.annotator, c.id, c.choice, c.supersedes, p.status, p.leased_to, "
                "p.lease_expires, p.strategy FROM comparisons c JOIN pairs p ON p.id = c.pair_id "
                f"WHERE p.status IN ('ready', 'leased') AND c.annotator = ANY(?) AND {kinds}",
                [names, *kind_args],
            ).fetchall()
        seen = _active(judged)
        for name in names:
            lost = [p for (_, who), p in seen.items() if who == name and p[3] != "own" and _available(p[0], p[2], now)]
            alone = [  # a lease of theirs still running, or an own pair of theirs they have not skipped
                pair_id
                for pair_id, status, holder, expires, strategy in theirs
                if holder == name and (_running(status, expires, now)
                                       or (strategy == "own" and _available(status, expires, now)
                                           and (pair_id, name) not in seen))
            ]  # fmt: skip
            counts[name] = shared - len(lost) + len(alone)
        return counts

    def undo(self, annotator: str) -> int | None:
        """Undo this person's latest vote or skip cast here (an 'undone' row supersedes it); the id undone, or None.
        The pair is leased to them again with a fresh lease, so it is the next pair they get, unless it went on to
        someone else after a skip (then only the skip is undone)."""
        annotator, now = annotator_name(annotator), utc_now()
        with self.store.transaction(lock="pairs") as cur:
            row = cur.execute(
                "SELECT c.id, c.pair_id FROM comparisons c WHERE c.annotator = ? AND c.source = 'ui' "
                "AND c.choice <> 'undone' "
                "AND NOT EXISTS (SELECT 1 FROM comparisons s WHERE s.supersedes = c.id) ORDER BY c.id DESC LIMIT 1",
                [annotator],
            ).fetchone()
            if row is None:
                return None
            self.store.undo_comparison(row[0], annotator, cur=cur)
            cur.execute(
                "UPDATE pairs SET status = 'leased', leased_to = ?, lease_expires = ? WHERE id = ? AND "
                f"((status IN ('done', 'leased') AND leased_to = ?) OR {AVAILABLE})",
                [annotator, now + self.lease, row[1], annotator, now],
            )
        return int(row[0])

    def vote(
        self,
        pair_id: int,
        annotator: str,
        choice: str,
        rationale: str | None = None,
        edited_answer: str | None = None,
        time_spent_s: float | None = None,
    ) -> int:
        """Validate, then store the vote with its pair change (see PairQueue.record_vote); the comparison id."""
        check_judgement(choice, rationale, edited_answer)
        return self._requests.run(
            Vote(int(pair_id), annotator_name(annotator), choice, rationale, edited_answer, time_spent_s)
        )

    def _run_requests(self, requests: list[str | Vote]) -> list:
        """Votes, then leases (not of pairs voted on in this batch), then one UPDATE of every changed pair."""
        votes = [r for r in requests if isinstance(r, Vote)]
        names = [r for r in requests if not isinstance(r, Vote)]
        with self.store.transaction(lock="pairs") as cur:  # on PostgreSQL: one app process at a time
            now = utc_now()
            voted, changes, new_names = self._vote_batch(cur, votes, now) if votes else ([], {}, [])
            known: dict[int, tuple] = {}
            leased = self._lease_batch(cur, names, now, changes, known) if names else []
            if changes:
                ids, values = list(changes), list(changes.values())
                cur.execute(
                    "UPDATE pairs SET status = m.status, leased_to = m.holder, lease_expires = m.expires FROM (SELECT "
                    "unnest(?::BIGINT[]) AS id, unnest(?::VARCHAR[]) AS status, unnest(?::VARCHAR[]) AS holder, "
                    "unnest(?::TIMESTAMP[]) AS expires) m WHERE pairs.id = m.id",
                    [ids, *([v[i] for v in values] for i in range(3))],
                )
        self._known_annotators.update(new_names)  # committed
        views = self.views([pair_id for pair_id in leased if pair_id is not None], known)
        voted, leased = iter(voted), iter(leased)
        return [next(voted) if isinstance(r, Vote) else views.get(next(leased)) for r in requests]

    def _lease_batch(self, cur, names: list[str], now: datetime, changes: dict, known: dict) -> list[int | None]:
        """Per name: the pair this person holds, else the oldest available pair they have not judged.
        New leases are added to `changes`; pairs already in `changes` (just voted on) are left alone; `known` gets
        the page fields of each pair given (for views)."""
        unique = list(dict.fromkeys(names))
        # The oldest available pairs, enough for everyone: a name can lose one pair to each other name of the batch
        # and to each pair voted on in it (then also one to each pair it judged or skipped: fetched again, 4× as
        # many, when someone is left without a pair). Two plain statements and the choice here: one statement that
        # ranked the pairs per name in SQL spent 5 of its 6 ms in DuckDB's planner, on every batch.
        limit = len(unique) + len(changes) + 8  # 8: room for a few pairs each name skipped, before a second look
        while True:
            candidates, more = self._candidates(cur, unique, now, limit)
            chosen = self._choose(candidates, unique, now, changes)
            if len(chosen) == len(unique) or not more:
                break
            limit *= 4
        for name, (pair_id, mine) in chosen.items():
            pair_id, _, _, _, strategy, *page = candidates[pair_id][0]
            known[pair_id] = (pair_id, *page, strategy)
            if not mine:
                changes[pair_id] = ("leased", name, now + self.lease)
        return [chosen[name][0] if name in chosen else None for name in names]

    @staticmethod
    def _candidates(cur, names: list[str], now: datetime, limit: int) -> tuple[dict[int, tuple], bool]:
        """({pair id: (row, who judged or skipped it and did not undo that)}, whether more pairs are available):
        every open pair these people hold or held, and the `limit` oldest available pairs."""
        rows = cur.execute(
            f"SELECT {CANDIDATE}, true FROM pairs WHERE status IN ('ready', 'leased') AND leased_to = ANY(?) "
            f"UNION ALL (SELECT {CANDIDATE}, false FROM pairs WHERE {AVAILABLE} AND strategy <> 'own' ORDER BY id "
            "LIMIT ?)",
            [names, now, limit],
        ).fetchall()
        more = sum(not row[-1] for row in rows) == limit
        pairs = {row[0]: row[:-1] for row in rows}
        seen: dict[int, set[str]] = {pair_id: set() for pair_id in pairs}
        if pairs:  # literal ids: a lookup, not a scan
            sql = (
                f"SELECT pair_id, annotator, id, choice, supersedes FROM comparisons WHERE pair_id IN ({_ints(pairs)})"
            )
            for pair_id, annotator in _active(cur.execute(sql).fetchall()):
                seen[pair_id].add(annotator)
        return {pair_id: (row, seen[pair_id]) for pair_id, row in pairs.items()}, more

    @staticmethod
    def _choose(candidates: dict[int, tuple], names: list[str], now: datetime, changes: dict) -> dict[str, tuple]:
        """{name: (pair id, whether they hold it already)}: first the unexpired leases each name holds (the latest
        first), then available pairs: their own expired leases (the latest first), then the oldest pairs they did not
        judge; one pair per name, none that was voted on in this batch or given to another name."""
        ranked = []
        for place, name in enumerate(names):
            for (pair_id, status, holder, expires, strategy, *_), seen in candidates.values():
                mine = holder == name and _running(status, expires, now)
                available = _available(status, expires, now)
                if not mine and not (available and (strategy != "own" or holder == name) and name not in seen):
                    continue
                held = expires if status == "leased" and holder == name else None
                order = (not mine, held is None, -held.timestamp() if held else 0.0, pair_id, place)
                ranked.append((order, name, pair_id, mine))
        chosen: dict[str, tuple] = {}
        taken: set[int] = set()
        for _, name, pair_id, mine in sorted(ranked):
            if name not in chosen and pair_id not in changes and pair_id not in taken:
                chosen[name] = (pair_id, mine)
                taken.add(pair_id)
        return chosen

    def _vote_batch(self, cur, votes: list[Vote], now: datetime) -> tuple[list[int | ValueError], dict, list[str]]:
        """Check each vote against its pair and insert the accepted comparisons (one INSERT). Returns the results
        (comparison id or the error), the pair changes {id: (status, leased_to, lease_expires)} and the names
        added to the annotators table (cached only once the transaction commits: a rollback takes them back)."""
        pairs = {
            row[0]: row[1:]
            for row in cur.execute(
                "SELECT id, status, leased_to, lease_expires, prompt_id, generation_a, generation_b, strategy "
                f"FROM pairs WHERE id IN ({_ints({v.pair_id for v in votes})})",  # literal ids: a lookup, not a scan
            ).fetchall()
        }
        changes, accepted, results = {}, [], []
        # A vote on a pair not leased to its voter may be a repeat (a retry, a skip retried after the pair went back
        # to others, a second click that reached another batch or app process): it gets the first one's id.
        not_theirs = [v.pair_id for v in votes if (pairs.get(v.pair_id) or ("", ""))[:2] != ("leased", v.annotator)]
        earlier = self._earlier_votes(cur, not_theirs)
        first: dict[tuple, int] = {}  # a vote accepted in this batch → its place in `results`
        for vote in votes:
            key = (vote.pair_id, vote.annotator, vote.choice, *_texts(vote))
            if key in first:  # the same vote twice in one batch (a double click): the same id
                results.append(_Same(first[key]))
                continue
            state = changes.get(vote.pair_id, pairs.get(vote.pair_id))
            same = earlier.get((vote.pair_id, vote.annotator))
            if vote.pair_id not in changes and same and same[1:] == (vote.choice, *_texts(vote)):
                results.append(same[0])
                continue
            problem = self._vote_problem(vote, state, now)
            results.append(problem)
            if problem is None:
                first[key] = len(results) - 1
                accepted.append(vote)
                back_to_others = (
                    vote.choice == "skip" and pairs[vote.pair_id][6] != "own"
                )  # a skipped own pair ends: it is theirs
                changes[vote.pair_id] = ("ready", None, None) if back_to_others else ("done", vote.annotator, None)
        if not accepted:
            return results, changes, []
        new_names = list({v.annotator for v in accepted} - self._known_annotators)
        rows = [
            [v.pair_id, *pairs[v.pair_id][3:6], v.annotator, v.choice, v.rationale, v.edited_answer, v.time_spent_s]
            + ["ui", None, None]  # source, supersedes, dedupe_key
            for v in accepted
        ]
        new_ids = iter(insert_comparisons(cur, rows, annotators=new_names))  # in the order of `accepted`
        results = [r if r is not None else next(new_ids) for r in results]
        return [results[r.place] if isinstance(r, _Same) else r for r in results], changes, new_names

    @staticmethod
    def _earlier_votes(cur, pair_ids: list[int]) -> dict[tuple[int, str], tuple]:
        """{(pair, annotator): (comparison id, choice, rationale, edited answer)} of the active judgements of these
        judged pairs, to tell a repeated vote from a new one."""
        if not pair_ids:
            return {}
        rows = cur.execute(
            "SELECT pair_id, annotator, id, choice, coalesce(rationale, ''), coalesce(edited_answer, '') "
            "FROM comparisons c WHERE pair_id = ANY(?) AND choice <> 'undone' "
            "AND NOT EXISTS (SELECT 1 FROM comparisons s WHERE s.supersedes = c.id)",
            [pair_ids],
        ).fetchall()
        return {(row[0], row[1]): row[2:] for row in rows}

    def _vote_problem(self, vote: Vote, pair: tuple | None, now: datetime) -> ValueError | None:
        if pair is None:
            return ValueError(f"there is no pair {vote.pair_id}")
        status, holder, expires = pair[:3]
        if status == "done":
            return ValueError(f"pair {vote.pair_id} was already judged")
        if status != "leased" or holder != vote.annotator:
            return ValueError(f"pair {vote.pair_id} is not leased to {vote.annotator}: ask for the next pair")
        if expires is not None and expires <= now:
            minutes = self.lease.total_seconds() / 60
            return ValueError(
                f"your lease on pair {vote.pair_id} expired (leases last {minutes:g} minutes); ask for the next pair"
            )
        return None

    def holder(self, pair_id: int) -> str | None:
        """Who holds an unexpired lease on this pair (None: nobody, or no such pair)."""
        with self.store.read() as cur:
            row = cur.execute(
                "SELECT leased_to FROM pairs WHERE id = ? AND status = 'leased' AND lease_expires > ?",
                [int(pair_id), utc_now()],
            ).fetchone()
        return row[0] if row else None

    def views(self, pair_ids: list[int], known: dict[int, tuple] | None = None) -> dict[int, dict]:
        """What the page shows of each pair: the pairs (unless `known` has their rows: id, prompt_id, generation_a,
        generation_b, strategy), then their prompts and answers, each looked up by id in a literal IN list (an index
        lookup; one query joining the three scanned every generation at a million)."""
        ids = sorted({int(i) for i in pair_ids})
        known = known or {}
        if not ids:
            return {}
        with self.store.read() as cur:
            pairs = [known[i] for i in ids if i in known]
            if missing := [i for i in ids if i not in known]:
                sql = "SELECT id, prompt_id, generation_a, generation_b, strategy FROM pairs WHERE id IN "
                pairs += cur.execute(f"{sql}({_ints(missing)})").fetchall()
            if not pairs:
                return {}
            answers = {
                row[0]: row[1:]
                for row in cur.execute(
                    "SELECT id, text, coalesce(model_version_id::VARCHAR, model_name), "
                    "coalesce(params->>'finish_reason' = 'length', false) FROM generations "
                    f"WHERE id IN ({_ints({g for p in pairs for g in p[2:4]})})"
                ).fetchall()
            }
            prompts = dict(
                cur.execute(
                    f"SELECT id, messages FROM prompts WHERE id IN ({_ints({p[1] for p in pairs})})"
                ).fetchall()
            )
        views = {}
        for pair_id, prompt_id, gen_a, gen_b, strategy in pairs:
            if prompt_id in prompts and gen_a in answers and gen_b in answers:
                (text_a, version_a, cut_a), (text_b, version_b, cut_b) = answers[gen_a], answers[gen_b]
                views[int(pair_id)] = _view(
                    (pair_id, prompts[prompt_id], text_a, text_b, version_a, version_b, strategy, cut_a, cut_b)
                )
        return views


@dataclass(frozen=True)
class _Same:
    place: int  # the result of the vote at this place in the batch


def _available(status: str, expires: datetime | None, now: datetime) -> bool:
    """AVAILABLE, for a row in hand: ready, or leased with the lease run out."""
    return status == "ready" or (status == "leased" and expires is not None and expires <= now)


def _running(status: str, expires: datetime | None, now: datetime) -> bool:
    """A lease still running: its holder keeps the pair (the opposite of a leased pair being AVAILABLE)."""
    return status == "leased" and expires is not None and expires > now


def _active(judged: list[tuple]) -> dict[tuple, tuple]:
    """{(pair, annotator): the rest of the row} of the rows (pair_id, annotator, id, choice, supersedes, ...) of
    judgements and skips not undone. An undo supersedes a comparison of the same pair: a pair's own rows say it all."""
    undone = {row[4] for row in judged if row[4] is not None}
    return {(row[0], row[1]): row[5:] for row in judged if row[3] != "undone" and row[2] not in undone}


def _ints(values) -> str:
    """A literal SQL list of integers (ids from the store itself)."""
    return ", ".join(str(int(v)) for v in sorted(values))


def _texts(vote: Vote) -> tuple[str, str]:
    return vote.rationale or "", vote.edited_answer or ""


def _version(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.isdigit() else value


def _view(row: tuple) -> dict:
    """One pair as the page shows it; `truncated_*`: that answer was cut at the token limit (finish 'length')."""
    pair_id, messages, answer_a, answer_b, version_a, version_b, strategy, cut_a, cut_b = row
    return {
        "pair_id": int(pair_id),
        "messages": json.loads(messages),
        "answer_a": answer_a,
        "answer_b": answer_b,
        "version_a": _version(version_a),
        "version_b": _version(version_b),
        "strategy": strategy,
        "truncated_a": bool(cut_a),
        "truncated_b": bool(cut_b),
    }

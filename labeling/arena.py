"""The arena: a newly trained policy version is a *candidate*, judged by people against the serving version before
it may serve.

Battles. The pair queue makes a share of its new pairs (`--arena-share`) 'versions' pairs: the newest candidate
against the serving version or the base (at random), same prompt and seed, sides at random; the page shows which
version wrote which side only in the receipt after the vote. Every effective comparison between two different
models counts (storage/ratings.py), imported arena battles too.

Gate rule. Candidate c may serve when its record against the serving version s, after at least `min_battles`
battles, has a Wilson interval (at `confidence`) whose lower bound is above 50 %; ties and both_bad count half a win
for each side. A candidate whose upper bound is below 50 % after as many battles is clearly worse: rejected (it gets
no more arena pairs; an admin can still serve it by hand). Anything else waits for more battles.

`GateWatcher` runs the rule in the background after votes (`poke`) and every `CHECK_SECONDS`, only when the
comparisons changed: with `auto_promote` a passing candidate is served at once ('auto' promotion), otherwise an admin
promotes it with the Leaderboard tab's button ('gate' promotion).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.promotions import candidates, set_status
from storage.ratings import battle_counts, head_to_head

CHECK_SECONDS = 10.0  # the watcher also looks this often when nobody votes (imports, CLI writes)
COALESCE_SECONDS = 1.0  # a burst of votes is one check


@dataclass(frozen=True)
class GateRule:
    min_battles: int = 20
    confidence: float = 0.95

    def __post_init__(self):
        if self.min_battles < 1:
            raise ValueError("the gate needs at least 1 battle")
        if not 0.5 < self.confidence < 1:
            raise ValueError("the gate confidence must be above 0.5 and below 1")


@dataclass(frozen=True)
class Verdict:
    candidate: int
    serving: int
    decision: str  # 'promote' | 'reject' | 'wait'
    record: dict  # storage.ratings.head_to_head of the candidate against the serving version
    rule: GateRule

    @property
    def passed(self) -> bool:
        return self.decision == "promote"

    def evidence(self) -> dict:
        """What a promotions row keeps: the record, the rule and the decision."""
        return {
            "candidate": model_name(self.candidate),
            "against": model_name(self.serving),
            **self.record,
            **asdict(self.rule),
            "decision": self.decision,
        }

    def summary(self) -> str:
        r, c, s = self.record, model_name(self.candidate), model_name(self.serving)
        if not r["battles"]:
            return f"{c} has no battles against {s} yet (the gate needs {self.rule.min_battles})."
        level = f"{self.rule.confidence:.0%}"
        line = (
            f"{c} vs {s}: {r['wins']} wins, {r['losses']} losses, {r['ties']} ties in {r['battles']} battles; "
            f"win-rate {r['win_rate']:.0%} ({level} CI {r['ci_low']:.0%}–{r['ci_high']:.0%})."
        )
        if self.decision == "promote":
            return f"{line} Passes the gate: the CI is above 50 %."
        if self.decision == "reject":
            return f"{line} Clearly worse: the CI is below 50 %."
        more = max(0, self.rule.min_battles - r["battles"])
        return f"{line} Not decided: " + (
            f"{more} more battles needed." if more else "the CI still contains 50 %; more battles needed."
        )


def model_name(version_id: int) -> str:
    """A version's name in the ratings (storage/ratings.py)."""
    return f"v{int(version_id)}"


def judge(source, candidate: int, serving: int, rule: GateRule) -> Verdict:
    """The gate's decision for `candidate` against `serving`; `source` is a Store or precomputed BattleCounts."""
    record = head_to_head(battle_counts(source), model_name(candidate), model_name(serving), rule.confidence)
    decision = "wait"
    if record["battles"] >= rule.min_battles:
        if record["ci_low"] > 0.5:
            decision = "promote"
        elif record["ci_high"] < 0.5:
            decision = "reject"
    return Verdict(int(candidate), int(serving), decision, record, rule)


def arena_plan(store, serving: int, skip=frozenset()) -> tuple[dict, list[int]] | None:
    """(the newest candidate whose adapter is on disk, its opponents: the serving version and the base), or None
    when no candidate waits. `skip`: candidates whose adapter does not load (the pair queue's `broken`)."""
    for candidate in candidates(store):
        if candidate["id"] not in {serving, *skip} and Path(candidate["adapter_path"]).is_dir():
            return candidate, sorted({int(serving), 0})
    return None


def current_verdict(store, serving: int, rule: GateRule, skip=frozenset()) -> Verdict | None:
    """The gate's view of the candidate the arena is judging now (None without one)."""
    plan = arena_plan(store, serving, skip)
    return judge(store, plan[0]["id"], serving, rule) if plan else None


def best_passing(verdicts: list[Verdict]) -> Verdict | None:
    """Of the candidates that pass the gate, the one with the highest lower bound (the newest on a tie)."""
    passing = [v for v in verdicts if v.passed]
    return max(passing, key=lambda v: (v.record["ci_low"], v.candidate)) if passing else None


class GateWatcher:
    """Applies the gate rule to the candidates in the background. `services` is labeling.services.Services."""

    def __init__(self, services, auto_promote: bool = False):
        self.services, self.auto_promote = services, auto_promote
        self.last_error: str | None = None
        self._seen = None  # the comparisons' (count, max id) at the last check
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="arena-gate", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def poke(self) -> None:
        """Votes came in: check soon (several pokes within COALESCE_SECONDS are one check)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(CHECK_SECONDS)
            self._stopping.wait(COALESCE_SECONDS)
            self._wake.clear()
            if self._stopping.is_set():
                break
            steps = [self.check]
            if self.services.store.dialect == "postgres":  # other app processes may promote or activate
                steps.insert(0, self.services.follow_serving)
            for step in steps:  # apart: a version this process cannot serve must not stop the gate
                try:
                    step()
                except Exception as exc:  # the watcher outlives one bad check; the tab shows the error
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    print(f"arena gate: {self.last_error}", file=sys.stderr)

    def check(self, force: bool = False) -> list[Verdict]:
        """Judge every candidate against the serving version (only when the comparisons, the serving version or the
        candidates changed since the last check that finished, unless `force`): reject the clearly worse (and
        retire their pairs); with auto_promote serve the best passing one. Returns the verdicts."""
        store, services = self.services.store, self.services
        with store.read() as cur:
            counted = cur.execute("SELECT count(*), max(id) FROM comparisons").fetchone()
        waiting = candidates(store)
        seen = (*counted, services.engine.active_version, tuple(c["id"] for c in waiting))
        if seen == self._seen and not force:
            return []
        verdicts = []
        with services.version_lock:  # the serving version holds still while the gate decides against it
            serving = services.engine.active_version
            counts = battle_counts(store) if waiting else None  # one aggregate for every candidate
            verdicts = [judge(counts, c["id"], serving, services.gate) for c in waiting if c["id"] != serving]
            rejected = [v.candidate for v in verdicts if v.decision == "reject"]
            for version in rejected:
                set_status(store, version, "rejected", only_if="candidate")  # not one served meanwhile
            if rejected:
                services.queue.on_version_change(serving)  # their pairs still waiting are retired
            if self.auto_promote and (best := best_passing(verdicts)) is not None:
                services.promote(best.candidate, actor="auto-promote", auto=True)
        services.free_adapters()  # of rejected candidates and of versions a promotion retired
        self._seen = seen  # only now: a check that failed runs again
        return verdicts

"""The 'endpoint' pair strategy: the serving version against a model served elsewhere (an OpenAI-compatible API).

Each pair: one prompt, the same sampling settings on both sides, one side answered by the engine (the serving
version) and the other by the served model, sides at random. The generations record who wrote them
(`model_version_id` for the local side, `model_name` = the served model's name for the other), the page shows
neither until the vote, and the leaderboard (storage/ratings.py) lists the served model under its name.

A served model that errors or times out makes no pair: its failure fails the pair and cancels the local side in the
engine, `status()` says why (PairQueue.progress() → the Label tab), and the strategy rests (30 s, doubling up to
5 min) while the other strategies keep the queue full. At most `max_in_flight` pairs wait on the server at once, so
a slow server never holds all of the engine's pair slots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
import time
from concurrent.futures import Future, InvalidStateError

from generation.backends import BackendError
from generation.sampling import SEED_RANGE, SamplingParams

ENDPOINT = "endpoint"  # the version slot of the served side in a pair plan
SHARE = 0.5  # with 'self' pairs on too: this share of the new pairs (after the arena's) are endpoint pairs
MAX_IN_FLIGHT = 4  # pairs waiting on the server at once (the engine makes ~7 pairs at a time)
BACKOFF_SECONDS = 30.0  # the rest after a failure, doubled per failure in a row
MAX_BACKOFF_SECONDS = 300.0


class EndpointSide:
    """The served model of 'endpoint' pairs: how many to make, the pair's two futures, failures and status."""

    def __init__(
        self,
        backend,
        max_in_flight: int = MAX_IN_FLIGHT,
        share: float = SHARE,
        backoff_s: float = BACKOFF_SECONDS,
        max_backoff_s: float = MAX_BACKOFF_SECONDS,
    ):
        self.backend, self.name = backend, backend.model
        self.max_in_flight, self.share = max_in_flight, share
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.answers = 0  # answers received since start
        self.last_error: str | None = None  # the last failure, until an answer arrives
        self._lock = threading.Lock()
        self._in_flight = self._failures = 0
        self._failed_at = float("-inf")  # when the last failure that doubled the pause was recorded
        self._resume_at = 0.0  # time.monotonic() when a resting strategy may ask the server again
        self._credit = 0.0

    def count(self, wanted: int, alone: bool) -> int:
        """How many of `wanted` new pairs should be endpoint pairs now: none while resting after a failure, at most
        the free in-flight room; all of them when `alone` (no 'self' pairs), else a share."""
        with self._lock:
            if wanted <= 0 or time.monotonic() < self._resume_at:
                return 0
            room = max(0, self.max_in_flight - self._in_flight)
            if alone:
                return min(wanted, room)
            self._credit = min(self._credit + wanted * self.share, float(wanted))
            made = min(room, int(self._credit + 1e-9))
            self._credit -= made
            return made

    def plans(self, prompts: list[tuple[int, list[dict]]], params: SamplingParams, version: int, rng) -> list:
        """Pair plans in the queue's form: (prompt id, messages, (params a, params b), (side a, side b)) with the
        serving version on one side and ENDPOINT on the other at random; one fresh seed for both sides."""
        params = dataclasses.replace(params, seed=secrets.randbelow(SEED_RANGE))
        return [(pid, m, (params, params), tuple(rng.sample((version, ENDPOINT), 2))) for pid, m in prompts]

    def submit_pair(self, engine, sides: list[tuple[list[dict], SamplingParams, object]]) -> list[Future]:
        """Start both sides of one planned pair: the local one in the engine, then the served one. Returns two
        futures in side order; when the served side fails, both fail with its error and the engine row is freed."""
        local_at = 0 if sides[1][2] == ENDPOINT else 1
        messages, params, version = sides[local_at]
        local = engine.submit(messages, params, version)  # first: a refused request (too long) starts no HTTP call
        with self._lock:
            self._in_flight += 1
        sent = time.monotonic()
        try:
            remote = self.backend.submit(sides[1 - local_at][0], sides[1 - local_at][1])
        except BaseException:
            self._record(BackendError("the request could not be started"), sent)
            local.cancel()
            raise
        local_view, remote_view = Future(), Future()

        def local_done(done: Future) -> None:
            if not done.cancelled():  # cancelled: the served side failed, local_view already holds that error
                _settle(local_view, done)

        def remote_done(done: Future) -> None:
            error = BackendError(f"{self.name}: the request was cancelled") if done.cancelled() else done.exception()
            self._record(error, sent)
            if error is None:
                _settle(remote_view, done)
                return
            for view in (remote_view, local_view):
                with contextlib.suppress(InvalidStateError):
                    view.set_exception(error)
            local.cancel()  # the engine drops the row at its next step

        local.add_done_callback(local_done)
        remote.add_done_callback(remote_done)
        return [local_view, remote_view] if local_at == 0 else [remote_view, local_view]

    def _record(self, error: BaseException | None, sent: float) -> None:
        """One answer or failure of a request sent at `sent`. Requests in flight together when the server fails
        are one failure: the pause doubles only for a request sent after the last failure (4 pairs in flight at
        one outage paused 240 s instead of 30)."""
        with self._lock:
            self._in_flight -= 1
            if error is None:
                self.answers += 1
                self._failures, self.last_error = 0, None
                return
            self.last_error = f"{error}"
            if sent <= self._failed_at:
                return
            self._failures, self._failed_at = self._failures + 1, time.monotonic()
            rest = min(self.backoff_s * 2 ** (self._failures - 1), self.max_backoff_s)
            self._resume_at = time.monotonic() + rest

    def status(self) -> str | None:
        """None while the served model answers; after a failure, what went wrong and when it is asked again."""
        with self._lock:
            if self.last_error is None:
                return None
            wait = max(0.0, self._resume_at - time.monotonic())
            again = f"asking again in {wait:.0f} s" if wait >= 1 else "asking again now"
            return f"the served model {self.name} failed ({self.last_error}); {again}, other pairs continue"

    def close(self) -> None:
        self.backend.close()


def _settle(view: Future, done: Future) -> None:
    with contextlib.suppress(InvalidStateError):
        if done.exception() is not None:
            view.set_exception(done.exception())
        else:
            view.set_result(done.result())

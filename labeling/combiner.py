"""Combiner: concurrent callers' requests handled together, a batch at a time (labeling/pair_leases.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

# How long after a batch is answered its leader's successor waits for the rest of the callers it served (measured: 16
# callers voting flat out come back within 0.6 ms (p50), 1.0 ms (p95) of their answers). Without it, callers that
# alternate two requests (lease, vote) split into groups that take turns, each request waiting for two batches; one
# batch of all costs little more than one of half, so the round trip falls by about a third. A lone caller (last batch
# of one) never waits, nor does a request that comes later than this after the last batch (people reading a pair).
LINGER_SECONDS = 0.002


class Combiner:
    """Callers queue an item; one caller at a time leads: it runs `batch(items)` for everything waiting, the others
    wait for their answers (and the next of them leads the next batch), so concurrent callers share transactions.
    A new leader first waits until LINGER_SECONDS after the last batch was answered for as many items as that batch
    had (those callers' next requests), so a steady crowd keeps sharing one batch instead of splitting into groups
    that take turns. With `kind`, a batch takes only items of the kind of the oldest waiting one (the rest wait for the
    next): callers that alternate two kinds then settle into batches of one kind each, which cost less than mixed ones.
    `batch` returns one result per item; an exception result is raised to that item's caller only. When the whole
    batch fails (its transaction rolled back: nothing of it was written), each item is run again alone, so one
    caller's bad request fails that caller only, not everyone who happened to share the batch."""

    def __init__(
        self,
        batch: Callable[[list], list],
        linger: float = LINGER_SECONDS,
        kind: Callable[[object], Hashable] | None = None,
    ):
        self._batch, self._linger, self._kind = batch, linger, kind
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a batch was answered, or the lead is free
        self._arrived = threading.Condition(self._lock)  # an item was queued (the lingering leader counts them)
        self._waiting: list[list] = []  # tickets: [item, result, answered]
        self._busy = False
        self._last, self._ended = 0, 0.0  # items in the last batch; when it was answered (time.monotonic)
        self._since = 0  # items queued since then (its callers coming back, or others)

    def run(self, item):
        ticket = [item, None, False]
        with self._changed:
            self._waiting.append(ticket)
            self._since += 1
            self._arrived.notify()
            while not ticket[2]:
                if self._busy:
                    self._changed.wait()
                    continue
                self._busy = True
                self._gather()
                tickets, self._waiting = self._take()
                self._last = len(tickets)
                results = [RuntimeError("interrupted")] * len(tickets)
                self._changed.release()
                try:
                    results = self._run([t[0] for t in tickets])
                finally:
                    self._changed.acquire()
                    self._busy, self._ended, self._since = False, time.monotonic(), 0
                    for waiting, result in zip(tickets, results, strict=True):
                        waiting[1:] = [result, True]
                    self._changed.notify_all()
        if isinstance(ticket[1], Exception):
            raise ticket[1]
        return ticket[1]

    def _take(self) -> tuple[list, list]:
        """(the tickets of this batch, those left waiting): all of them, or with `kind`, those of the oldest one's."""
        if self._kind is None:
            return self._waiting, []
        first = self._kind(self._waiting[0][0])
        taken, left = [], []
        for ticket in self._waiting:
            (taken if self._kind(ticket[0]) == first else left).append(ticket)
        return taken, left

    def _gather(self) -> None:
        """Wait (lock held, released while waiting) until as many items as the last batch had were queued since it
        ended, or the linger after its end is over."""
        deadline = self._ended + self._linger
        while self._since < self._last and (left := deadline - time.monotonic()) > 0:
            self._arrived.wait(left)

    def _run(self, items: list) -> list:
        try:
            return self._batch(items)
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        return [self._run([item])[0] for item in items]

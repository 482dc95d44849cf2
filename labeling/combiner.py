"""Combiner: concurrent callers' requests handled together, a batch at a time (labeling/pair_leases.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Combiner:
    """Callers queue an item; one caller at a time leads: it runs `batch(items)` for everything waiting, the others
    wait for their answers (and the next of them leads the next batch), so concurrent callers share transactions.
    `batch` returns one result per item; an exception result is raised to that item's caller only. When the whole
    batch fails (its transaction rolled back: nothing of it was written), each item is run again alone, so one
    caller's bad request fails that caller only, not everyone who happened to share the batch."""

    def __init__(self, batch: Callable[[list], list]):
        self._batch = batch
        self._changed = threading.Condition()
        self._waiting: list[list] = []  # tickets: [item, result, answered]
        self._busy = False

    def run(self, item):
        ticket = [item, None, False]
        with self._changed:
            self._waiting.append(ticket)
            while not ticket[2]:
                if self._busy:
                    self._changed.wait()
                    continue
                self._busy, tickets, self._waiting = True, self._waiting, []
                results = [RuntimeError("interrupted")] * len(tickets)
                self._changed.release()
                try:
                    results = self._run([t[0] for t in tickets])
                finally:
                    self._changed.acquire()
                    self._busy = False
                    for waiting, result in zip(tickets, results, strict=True):
                        waiting[1:] = [result, True]
                    self._changed.notify_all()
        if isinstance(ticket[1], Exception):
            raise ticket[1]
        return ticket[1]

    def _run(self, items: list) -> list:
        try:
            return self._batch(items)
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        return [self._run([item])[0] for item in items]

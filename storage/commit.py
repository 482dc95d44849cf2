"""Group commit: many writer threads, one committer thread, one transaction per batch of queued writes.

Each write is a function of a cursor; writers queue it, and the committer runs every queued function in one
transaction, so 32 threads cost about one commit per batch instead of one each. A write returns only after its
COMMIT. If a batch fails, each function is retried alone, so one bad write never takes others down with it.

Faults stick nothing: a failing COMMIT or ROLLBACK (disk full, an I/O error) ends the cursor, not the committer,
and every write of the batch gets an answer. Should the committer thread still die, writers notice within
`CHECK_SECONDS`, the writes it held get an error and the next write starts a new committer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

CHECK_SECONDS = 0.25  # how often a waiting writer checks that the committer is alive


class CommitterStopped(RuntimeError):
    """The commit thread died while it held this write; the write may not have been stored."""


class Pending:
    """One queued write: `fn(cursor)`; `row` (comparison values) when it can join a multi-row INSERT."""

    __slots__ = ("fn", "row", "result", "error", "done")

    def __init__(self, fn: Callable, row: list | None = None):
        self.fn, self.row, self.result, self.error, self.done = fn, row, None, None, False


class GroupCommit:
    """`cursor()` opens a cursor; `write_lock` is held around each batch; `insert_rows(cur, items)` stores the
    items that carry a `row` in one statement and returns {id(item): result}."""

    def __init__(self, cursor: Callable, write_lock: threading.Lock, insert_rows: Callable):
        self._cursor, self._write_lock, self._insert_rows = cursor, write_lock, insert_rows
        self._ready = threading.Condition()
        self._pending: list[Pending] = []
        self._running: list[Pending] = []  # the batch the committer holds now
        self._thread: threading.Thread | None = None
        self._closing = False
        self.restarts = 0  # committers started again after one died (tests, figures)

    def write(self, fn: Callable, row: list | None = None):
        item = Pending(fn, row)
        with self._ready:
            if self._closing:
                raise RuntimeError("the store is closed")
            self._ensure_thread()
            self._pending.append(item)
            self._ready.notify_all()
            while not item.done:
                self._ready.wait(CHECK_SECONDS)
                if not item.done and not self._thread.is_alive():
                    self._ensure_thread()  # the writes still queued go to a new committer
        if item.error is not None:
            raise item.error
        return item.result

    def close(self, timeout: float = 10) -> None:
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _ensure_thread(self) -> None:
        """Start a committer when none runs (called with `_ready` held). When one died, the writes it held hear so
        first, whoever notices: a writer arriving after the death, or one waiting (a new committer started without
        this would take over `_running`, and the writes the dead one held would wait forever)."""
        if self._thread is not None and not self._thread.is_alive():
            self._fail(self._running, CommitterStopped("the commit thread stopped; this write was not stored"))
            self._running = []
            self.restarts += 1
            self._ready.notify_all()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="duckdb-committer", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        """Whatever queued up during a commit goes in the next one."""
        while True:
            with self._ready:
                while not self._pending and not self._closing:
                    self._ready.wait()
                if self._closing and not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._running = batch
            try:
                with self._write_lock:
                    self._run_batch(batch)
            except Exception as exc:  # e.g. no cursor could be opened: the batch hears why, the loop goes on
                self._fail(batch, exc)
            with self._ready:
                self._running = []
                self._ready.notify_all()

    def _run_batch(self, batch: list[Pending]) -> None:
        cur = self._cursor()
        try:
            try:
                cur.execute("BEGIN")
                results = {id(item): item.fn(cur) for item in batch if item.row is None}
                results.update(self._insert_rows(cur, [item for item in batch if item.row is not None]))
                cur.execute("COMMIT")
            except Exception:
                cur = self._abort(cur)
                results = None
            if results is not None:
                for item in batch:
                    item.result, item.done = results[id(item)], True
                return
            for item in batch:  # the batch failed: each alone, so only the bad one fails
                try:
                    cur.execute("BEGIN")
                    item.result = item.fn(cur)
                    cur.execute("COMMIT")
                except Exception as exc:
                    cur = self._abort(cur)
                    item.error = exc
                item.done = True
        finally:
            with contextlib.suppress(Exception):
                cur.close()

    def _abort(self, cur):
        """Roll back; when ROLLBACK fails too (the failed COMMIT already ended the transaction, or the file is
        gone), drop the cursor, which discards whatever it still held, and go on with a fresh one."""
        try:
            cur.execute("ROLLBACK")
            return cur
        except Exception:
            with contextlib.suppress(Exception):
                cur.close()
            return self._cursor()

    @staticmethod
    def _fail(items: list[Pending], exc: BaseException) -> None:
        for item in items:
            if not item.done:
                item.error, item.done = exc, True

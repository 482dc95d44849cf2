"""The app's one shutdown path: SIGTERM, SIGINT and a normal exit all run the same registered steps, once.

Steps run in reverse order of registration (last started, first stopped), each guarded so one failing step
never skips the others: e.g. stop the pair queue, end the training child's process group, flush backups.
"""

from __future__ import annotations

import atexit
import signal
import sys
import threading
import traceback
from collections.abc import Callable


class Shutdown:
    def __init__(self):
        self._steps: list[tuple[str, Callable[[], object]]] = []
        self._lock = threading.Lock()
        self._done = False

    def register(self, name: str, step: Callable[[], object]) -> None:
        """Run `step()` at shutdown (steps registered later run first)."""
        with self._lock:
            self._steps.append((name, step))

    def run(self) -> None:
        """Run every step once, newest first; errors are printed, never raised."""
        with self._lock:
            if self._done:
                return
            self._done = True
            steps = list(reversed(self._steps))
        for name, step in steps:
            try:
                step()
            except Exception:  # one broken step must not keep the others from running
                print(f"prefloop: shutdown step {name!r} failed:\n{traceback.format_exc()}", file=sys.stderr)

    def install(self) -> None:
        """SIGTERM/SIGINT run the steps, then exit; so does a normal interpreter exit (atexit)."""
        atexit.register(self.run)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (tests start apps elsewhere)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        print(f"prefloop: {signal.Signals(signum).name}: shutting down", file=sys.stderr, flush=True)
        self.run()
        sys.exit(128 + signum)

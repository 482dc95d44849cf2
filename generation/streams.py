"""Streaming pairs: two requests decoded side by side, read as cumulative (text_a, text_b) while tokens arrive."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from generation.sampling import Generation, Listener


class PairStream:
    """Iterate for cumulative (text_a, text_b) as tokens arrive; afterwards `.result` is (Generation_a, Generation_b).

    `start(listeners)` queues the two requests, side a reporting to listeners[0] and side b to listeners[1], and
    returns their futures (`GenerationEngine.stream_pair` does this). Both requests join the engine's shared batch,
    so a stream never waits for a whole batch of others to finish."""

    def __init__(self, start: Callable[[tuple[Listener, Listener]], list[Future]]):
        self._events: queue.Queue = queue.Queue()  # (side, cumulative text), or (side, None) once that side is done
        self._futures = start((self._listener(0), self._listener(1)))
        for side, future in enumerate(self._futures):
            future.add_done_callback(lambda _f, side=side: self._events.put((side, None)))
        self.result: tuple[Generation, Generation] | None = None

    def _listener(self, side: int) -> Listener:
        return lambda text: self._events.put((side, text))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        texts, finished = ["", ""], [False, False]
        while not all(finished):
            events = [self._events.get()]
            while not self._events.empty():  # coalesce what piled up into one update
                events.append(self._events.get_nowait())
            for side, text in events:
                if text is None:
                    finished[side] = True
                else:
                    texts[side] = text
            yield texts[0], texts[1]
        generations = (self._futures[0].result(), self._futures[1].result())  # raises the worker's error, if any
        self.result = generations
        if (generations[0].text, generations[1].text) != tuple(texts):
            yield generations[0].text, generations[1].text

    def cancel(self) -> None:
        """Give up on both sides: the engine frees their rows at its next step (the reader went away)."""
        for future in self._futures:
            future.cancel()

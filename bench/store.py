"""Comparisons written per second into a real DuckDB file, with 1 and with 32 writer threads.

Each thread calls Store.add_comparison in a loop, as labelling request threads do; a write returns only after
its COMMIT (group commit batches concurrent writers). Run: `python bench/store.py` (well under a minute).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from storage.db import Store  # noqa: E402

TARGET_PER_SECOND = 2_000  # the target with 32 threads on this 2-core machine
WRITES = {1: 1_000, 32: 8_000}  # writer threads: calls; each run takes a few seconds at a steady rate


def bench(store: Store, threads: int, writes: int) -> float:
    """Comparisons per second when `threads` threads share `writes` add_comparison calls."""
    prompt = store.add_prompt("Which answer is better?", "bench")
    gen_a = store.add_generation(prompt, "First answer.", model_version_id=0)
    gen_b = store.add_generation(prompt, "Second answer.", model_version_id=0)
    per_thread = writes // threads
    start_line = threading.Barrier(threads + 1)

    def writer(n: int) -> None:
        start_line.wait()
        for i in range(per_thread):
            store.add_comparison(prompt_id=prompt, generation_a=gen_a, generation_b=gen_b, annotator=f"bench-{n}",
                                 choice="A" if i % 2 else "B", source="bench")  # fmt: skip

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    start_line.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    return per_thread * threads / (time.perf_counter() - started)


def main() -> None:
    print(f"{'writer threads':>14}  {'comparisons/s':>13}")
    rates = {}
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-") as folder:
        for threads, writes in WRITES.items():
            store = Store(Path(folder) / f"bench-{threads}.duckdb")
            try:
                rates[threads] = bench(store, threads, writes)
                with store.read() as cur:
                    stored = cur.execute("SELECT count(*) FROM comparisons").fetchone()[0]
            finally:
                store.close()
            assert stored == writes // threads * threads, f"only {stored} comparisons were stored"
            print(f"{threads:>14}  {rates[threads]:>13,.0f}")
    verdict = "met" if rates[32] >= TARGET_PER_SECOND else "NOT met"
    print(f"target: >= {TARGET_PER_SECOND:,}/s with 32 threads: {verdict}")


if __name__ == "__main__":
    main()

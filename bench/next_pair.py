"""p50/p95 time to hand out the next pair from a warm queue, 16 concurrent callers. Target: p95 ≤ 50 ms.

    python bench/next_pair.py [--callers 16] [--rounds 25] [--with-refill]
    python bench/next_pair.py --db postgresql://user@host/postgres [--stores 2]

A temporary DuckDB file gets prompts and enough ready pairs (answers of realistic length, written through the
store like the queue writes them). Each caller repeatedly leases a pair (timed) and votes on it (not timed), so
every call has to find a pair the caller has not judged among a growing history of comparisons. By default
callers vote at once (no reading time: the store is saturated); --think-ms adds a pause before each vote. With
--with-refill the real engine and refill thread also generate pairs on the bundled model during the run, as in
the app (the model then competes for the 2 cores).

--db postgresql://…: the same on PostgreSQL, in a new database made on that server (dropped after); --stores K
splits the callers over K stores (each its own connection pool and lease desk, as K app processes would have;
here they share one Python process, so the figure includes their GIL contention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ANSWER = "A plausible answer of a few sentences, about as long as the bundled model writes. " * 8  # ≈ 650 chars


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=25, help="leases per caller")
    parser.add_argument("--think-ms", type=float, default=0.0, help="pause between lease and vote (0: flat out)")
    parser.add_argument("--with-refill", action="store_true", help="generate pairs on the bundled model meanwhile")
    parser.add_argument("--db", help="a postgresql:// URL of a server (a new database is made there); default DuckDB")
    parser.add_argument("--stores", type=int, default=1, help="PostgreSQL: stores (app processes) sharing the callers")
    return parser.parse_args()


def fill(store, pairs: int) -> None:
    """Ready pairs stored like the queue stores them: two generations and the pair row per transaction."""
    for i in range(pairs):
        with store.transaction() as cur:
            prompt = store.add_prompt(f"Benchmark question {i}: what should I know about topic {i}?", "bench", cur=cur)
            gens = [store.add_generation(prompt, f"{side} {ANSWER}", model_version_id=0,
                                         params={"temperature": 0.8, "seed": i}, token_count=140, latency_ms=9000.0,
                                         cur=cur) for side in ("A", "B")]  # fmt: skip
            cur.execute(
                "INSERT INTO pairs (id, prompt_id, strategy, generation_a, generation_b, status) "
                "VALUES (nextval('pairs_id_seq'), ?, 'self', ?, ?, 'ready')",
                [prompt, *gens],
            )


@contextlib.contextmanager
def bench_database(url: str | None, folder: Path):
    """A DuckDB file in `folder`, or a new database on the PostgreSQL server at `url` (dropped afterwards)."""
    if not url:
        yield str(folder / "bench.duckdb")
        return
    import uuid

    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def caller(queue, name: str, rounds: int, think_ms: float, timings: list[float], start: threading.Barrier,
           errors: list[str]) -> None:  # fmt: skip
    start.wait()
    try:
        for _ in range(rounds):
            began = time.perf_counter()
            pair = queue.next_pair(name)
            timings.append((time.perf_counter() - began) * 1000)
            if pair is None:
                raise RuntimeError("the queue ran dry")
            time.sleep(think_ms / 1000)
            queue.record_vote(pair["pair_id"], name, "A", time_spent_s=3.0)
    except Exception as exc:
        errors.append(f"{name}: {exc}")


def main() -> None:
    args = parse_args()
    from labeling.pair_queue import PairQueue
    from storage.db import Store

    with tempfile.TemporaryDirectory() as tmp, bench_database(args.db, Path(tmp)) as location:
        store = Store(location)
        fill(store, args.callers * args.rounds + 50)  # enough that nobody runs dry
        engine = None
        if args.with_refill:
            from generation.engine import GenerationEngine
            from generation.sampling import SamplingParams

            engine = GenerationEngine("bundled")
            queue = PairQueue(store, engine, target=10_000, params=SamplingParams(max_new_tokens=64))
            queue.start()
        else:
            queue = PairQueue(store, engine=None)  # leasing never touches the engine
        others = [Store(location) for _ in range(args.stores - 1)]  # more app processes on the same database
        queues = [queue] + [PairQueue(other, engine=None) for other in others]
        timings: list[float] = []
        errors: list[str] = []
        start = threading.Barrier(args.callers)
        threads = [threading.Thread(target=caller, args=(queues[i % len(queues)], f"annotator{i}", args.rounds,
                                                         args.think_ms, timings, start, errors))
                   for i in range(args.callers)]  # fmt: skip
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        if engine is not None:
            queue.stop()
            engine.close()
        for each in [store, *others]:
            each.close()
    if errors:
        raise SystemExit(f"{len(errors)} callers failed, e.g. {errors[0]}")
    cuts = statistics.quantiles(timings, n=100)
    p50, p95 = cuts[49], cuts[94]
    where = f"PostgreSQL, {args.stores} store(s)" if args.db else "DuckDB"
    print(f"{len(timings)} leases by {args.callers} concurrent callers in {wall:.1f} s on {where} "
          f"(load average {os.getloadavg()[0]:.1f} on 2 cores{', refill generating' if engine else ''})")  # fmt: skip
    print(f"next_pair: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(timings):.1f} ms (target p95 ≤ 50 ms)")
    print(json.dumps({"p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "calls": len(timings)}))


if __name__ == "__main__":
    main()

"""The data of bench/scale.py: Chatbot-Arena-style parquet files, imported through the product's importer.

`build(store, comparisons, folder)` writes the comparisons as arena-format parquet files of CHUNK rows (prompts
shared by two comparisons each, 24 models, 200 judges including the bench's callers, answers of 300–900
characters drawn from a pool with a unique tail) and imports each with storage.importers.import_file, timed.
`add_history` then makes the store look like one that people labelled: a 'done' pair per comparison (the UI
stores each vote with its pair) and 1% of the judgements undone (an 'undone' row superseding them).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

CHUNK = 100_000  # rows per imported file (a browser upload holds at most 200,000)
MODELS = [f"model-{i:02d}" for i in range(24)]
JUDGES = [f"annotator{i}" for i in range(200)]  # the bench's callers are annotator0..15: they have a history
WORDS = (
    "the of and to in is that for it as with was on be by this are or an which from at have not but model "
    "answer value data train reward policy vote pair prompt token batch loss step rate table index query cache "
    "lease queue store commit write read scan join count group order limit row column file"
).split()
WINNERS = ("model_a", "model_b", "model_a", "model_b", "tie", "tie (bothbad)")


def answer_pool(size: int = 4096, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(60, 180))).capitalize() + "." for _ in range(size)]


def write_chunk(path: Path, start: int, count: int, pool: list[str]) -> None:
    """Comparisons start..start+count as one arena parquet file; prompt i // 2, so two comparisons per prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(start)
    rows = {"question_id": [], "model_a": [], "model_b": [], "winner": [], "judge": [], "conversation_a": [],
            "conversation_b": []}  # fmt: skip
    for i in range(start, start + count):
        question = f"Question {i // 2}: {pool[(i // 2) % len(pool)][:120]}?"
        model_a, model_b = rng.sample(MODELS, 2)
        rows["question_id"].append(str(i))
        rows["model_a"].append(model_a)
        rows["model_b"].append(model_b)
        rows["winner"].append(WINNERS[rng.randrange(len(WINNERS))])
        rows["judge"].append(JUDGES[rng.randrange(len(JUDGES))])
        for side, column in (("a", "conversation_a"), ("b", "conversation_b")):
            text = f"{pool[rng.randrange(len(pool))]} ({side}{i})"
            rows[column].append([{"role": "user", "content": question}, {"role": "assistant", "content": text}])
    pq.write_table(pa.table(rows), path)


def build(store, comparisons: int, folder: Path, log=print) -> dict:
    """Write and import `comparisons` arena rows in CHUNK-row files. Returns the timings (import only)."""
    from storage.importers import import_file

    pool = answer_pool()
    folder.mkdir(parents=True, exist_ok=True)
    imported, seconds, cpu, files = 0, 0.0, 0.0, 0
    for start in range(0, comparisons, CHUNK):
        count = min(CHUNK, comparisons - start)
        path = folder / f"arena-{start:08d}.parquet"
        write_chunk(path, start, count, pool)
        began, began_cpu = time.perf_counter(), time.process_time()
        summary = import_file(store, path, fmt="arena")
        took = time.perf_counter() - began
        seconds, cpu = seconds + took, cpu + time.process_time() - began_cpu
        imported += summary["comparisons"]
        files += 1
        path.unlink()
        log(f"  imported {imported:,} comparisons ({summary['comparisons'] / took:,.0f}/s this file, "
            f"{imported / seconds:,.0f}/s so far; load {os.getloadavg()[0]:.1f})")  # fmt: skip
    return {"comparisons": imported, "seconds": seconds, "cpu_seconds": cpu, "files": files,
            "per_second": imported / seconds, "load": os.getloadavg()[0]}  # fmt: skip


def add_history(store, undo_share: float = 0.01) -> None:
    """A done pair for every comparison (as UI votes leave them) and `undo_share` of the judgements undone."""
    with store.transaction() as cur:
        cur.execute(
            "CREATE TEMP TABLE bench_pairs AS SELECT c.id AS comparison_id, nextval('pairs_id_seq') AS pair_id "
            "FROM comparisons c WHERE c.pair_id IS NULL ORDER BY c.id"
        )
        cur.execute(
            "INSERT INTO pairs (id, prompt_id, strategy, generation_a, generation_b, status, leased_to, created_at) "
            "SELECT b.pair_id, c.prompt_id, 'import', c.generation_a, c.generation_b, 'done', c.annotator, "
            "c.created_at FROM bench_pairs b JOIN comparisons c ON c.id = b.comparison_id ORDER BY b.pair_id"
        )
        cur.execute(
            "UPDATE comparisons SET pair_id = b.pair_id FROM bench_pairs b WHERE comparisons.id = b.comparison_id"
        )
        cur.execute("DROP TABLE bench_pairs")
        step = max(1, round(1 / undo_share)) if undo_share > 0 else 0
        if step:
            cur.execute(
                "INSERT INTO comparisons (id, pair_id, prompt_id, generation_a, generation_b, annotator, choice, "
                "source, supersedes) SELECT nextval('comparisons_id_seq'), pair_id, prompt_id, generation_a, "
                "generation_b, annotator, 'undone', 'undo', id FROM comparisons "
                "WHERE id % ? = 0 AND supersedes IS NULL ORDER BY id",
                [step],
            )

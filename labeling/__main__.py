"""Headless pair generation: fill the pair queue without the web app.

    python -m labeling generate --pairs N [--strategy self|versions] [--db DB] [--model M] [--model-cache DIR]
                                [--max-new-tokens N] [--repetition-penalty X]

Generates exactly N pairs (beyond the app's queue target) from the prompts with the fewest comparisons, stores them
as 'ready' in the DuckDB file, shows a progress bar on stderr and ends with one JSON line on stdout:
{"pairs": N, "strategy": "self", "db": ..., "seconds": ...}. Bad input prints `error: ...` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from generation.defaults import REPETITION_PENALTY, repetition_penalty_problem
from labeling.deploy import env_number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m labeling", description="prefloop labeling tools")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate answer pairs into the queue")
    generate.add_argument("--pairs", type=int, required=True, help="how many pairs to generate")
    generate.add_argument("--strategy", choices=["self", "versions"], default="self")
    db = env("PREFLOOP_DB", "data/prefloop.duckdb")
    generate.add_argument("--db", default=db, help="the DuckDB file or a postgresql:// URL")
    generate.add_argument("--model", default=env("PREFLOOP_MODEL", "bundled"), help="bundled, a HF id or a folder")
    generate.add_argument("--model-cache", default=env("PREFLOOP_MODEL_CACHE", "data/models"))
    max_new = env_number(parser, "PREFLOOP_MAX_NEW_TOKENS", 512)  # one usage error when it is no number
    generate.add_argument("--max-new-tokens", type=int, default=max_new)
    penalty = env_number(parser, "PREFLOOP_REPETITION_PENALTY", REPETITION_PENALTY, float)
    generate.add_argument("--repetition-penalty", type=float, default=penalty, help="in [1, 2], 1 = off")
    generate.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    generate.add_argument("--threads", type=int, default=None, help="torch threads (default: half the cores)")
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def open_store(path: str):
    import duckdb

    from storage.db import Store
    from storage.postgres import is_postgres

    if path != ":memory:" and not is_postgres(path) and not Path(path).is_file():
        fail(f"there is no database at {path} (start the app once or import prompts: python -m storage import FILE)")
    try:
        return Store(path)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            fail(f"{path} is in use by another process (is the app running?): stop it or pass another --db")
        fail(f"cannot open {path}: {exc}")


def serve_saved_version(store, engine) -> None:
    """Generate from the version the app serves (setting 'active_version'), when it has an adapter on disk."""
    saved = store.get_setting("active_version")
    version = store.get_version(int(saved)) if saved and saved.isdigit() and saved != "0" else None
    if version and version.get("adapter_path") and Path(version["adapter_path"]).is_dir():
        engine.load_version(version["id"], version["adapter_path"])
        engine.set_active(version["id"])


def generate(args: argparse.Namespace) -> dict:
    if args.pairs < 1:
        fail("--pairs must be at least 1")
    if args.max_new_tokens < 1 or args.max_batch < 2:
        fail("--max-new-tokens must be at least 1 and --max-batch at least 2 (a pair is two rows)")
    if problem := repetition_penalty_problem(args.repetition_penalty):
        fail(f"--repetition-penalty {problem}")
    store = open_store(args.db)
    try:
        with store.read() as cur:
            if cur.execute("SELECT count(*) FROM prompts WHERE source <> 'own'").fetchone()[0] == 0:
                fail("import prompts first: python -m storage import FILE")
        return run_generation(store, args)
    finally:
        store.close()


def run_generation(store, args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from generation.engine import GenerationEngine
    from generation.sampling import SamplingParams
    from labeling.pair_queue import PairQueue

    try:
        engine = GenerationEngine(args.model, args.model_cache, max_batch=args.max_batch, threads=args.threads)
    except (OSError, ValueError) as exc:
        fail(f"cannot load the model {args.model!r}: {exc}")
    started = time.monotonic()
    try:
        serve_saved_version(store, engine)
        queue = PairQueue(store, engine, target=0, strategies=(args.strategy,),
                          params=SamplingParams(max_new_tokens=args.max_new_tokens,
                                                repetition_penalty=args.repetition_penalty))  # fmt: skip
        queue.reserved_rows = 0  # nobody streams here: use every batch row
        with tqdm(total=args.pairs, unit="pair", desc=f"{args.strategy} pairs", file=sys.stderr) as bar:
            made = queue.generate_pairs(args.pairs, args.strategy, on_pair=lambda _n: bar.update(1))
    except ValueError as exc:
        fail(str(exc))
    finally:
        engine.close()
    return {"pairs": made, "strategy": args.strategy, "db": args.db, "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "generate":
        print(json.dumps(generate(args)), flush=True)


if __name__ == "__main__":
    main()

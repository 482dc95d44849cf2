"""Deployment options of the app: backups, a served model on one side of pairs, the generation engine, Spaces.

`add_deploy_args` adds the flags (each with an environment variable, so a Space sets them as variables; `env_*`
read one, refusing a value that is no number / yes-no / choice), `check_app_args` and `check_deploy_args` refuse values
and combinations that cannot work, before anything loads; the `open_*` / `create_*` helpers build the pieces that
app.py wires into its services. Heavy imports stay inside the functions (start-up time).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from storage.postgres import is_postgres

ENGINES = ("local", "vllm")
DEVICES = ("auto", "cuda", "cpu")  # PREFLOOP_DEVICE (models/device.py)
YES_NO = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
MAX_LEASE_MINUTES = 7 * 24 * 60  # a week; far beyond it the expiry leaves the datetime range

# Every numeric app flag but --queue-size and --backup-every (checked below): variable, allowed?, what it must be
LIMITS = {
    "--port": ("PREFLOOP_PORT, else GRADIO_SERVER_PORT", lambda v: 1 <= v <= 65535, "a port in [1, 65535]"),
    "--max-new-tokens": ("PREFLOOP_MAX_NEW_TOKENS", lambda v: v >= 1, "≥ 1 tokens"),
    "--engine-threads": ("PREFLOOP_ENGINE_THREADS", lambda v: v is None or v >= 0, "≥ 1 threads (0 = half the cores)"),
    "--max-file-size-mb": ("PREFLOOP_MAX_FILE_SIZE_MB", lambda v: v >= 1, "≥ 1 MB"),
    "--upload-max-rows": ("PREFLOOP_UPLOAD_MAX_ROWS", lambda v: v >= 1, "≥ 1 rows"),
    "--queue-max": ("PREFLOOP_QUEUE_MAX", lambda v: v >= 1, "≥ 1 requests"),
    "--lease-minutes": (
        "PREFLOOP_LEASE_MINUTES",
        lambda v: 0 < v <= MAX_LEASE_MINUTES,
        f"in (0, {MAX_LEASE_MINUTES}] minutes",
    ),
    "--arena-share": ("PREFLOOP_ARENA_SHARE", lambda v: 0 <= v <= 1, "a share of the new pairs in [0, 1]"),
    "--gate-min-battles": ("PREFLOOP_GATE_MIN_BATTLES", lambda v: v >= 1, "≥ 1 battles"),
    "--gate-confidence": ("PREFLOOP_GATE_CONFIDENCE", lambda v: 0.5 < v < 1, "in (0.5, 1)"),
    "--compare-timeout": ("PREFLOOP_COMPARE_TIMEOUT", lambda v: 0 < v < math.inf, "a finite number of seconds > 0"),
}


def env_number(parser: argparse.ArgumentParser, name: str, default, kind: type = int):
    """$name as `kind` (int or float), `default` when unset; parser.error naming the variable when it is not one."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        parser.error(f"{name} must be {'an integer' if kind is int else 'a number'}, not {raw!r}")


def env_yes_no(parser: argparse.ArgumentParser, name: str) -> bool:
    """$name as a yes/no (1/true/yes/on or 0/false/no/off, any case; unset or empty: no), else parser.error."""
    raw = os.environ.get(name, "")
    if raw.strip() and raw.strip().lower() not in YES_NO:
        parser.error(f"{name} must be 1/true/yes/on or 0/false/no/off, not {raw!r}")
    return YES_NO.get(raw.strip().lower(), False)


def env_choice(parser: argparse.ArgumentParser, name: str, choices, default: str) -> str:
    """$name if it is one of `choices` (argparse does not check a default against them), `default` when unset."""
    value = os.environ.get(name, default)
    if value not in choices:
        parser.error(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def add_deploy_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    group = parser.add_argument_group("deployment", "backups, a served model to compare with, the engine")
    group.add_argument(
        "--backup-dir",
        default=env("PREFLOOP_BACKUP_DIR"),
        help="parquet backups of the database (restored into a new database at start)",
    )
    group.add_argument(
        "--backup-every",
        type=float,
        default=env_number(parser, "PREFLOOP_BACKUP_EVERY", 300.0, float),
        help="seconds between backup flushes (one more at shutdown)",
    )
    group.add_argument(
        "--backup-hub-repo",
        default=env("PREFLOOP_BACKUP_HUB_REPO"),
        help="OWNER/NAME: mirror the backups and adapters with a private HF dataset (needs HF_TOKEN)",
    )
    group.add_argument(
        "--compare-endpoint",
        default=env("PREFLOOP_COMPARE_ENDPOINT"),
        help="OpenAI-compatible base URL, e.g. http://host:8000/v1: answers one side of endpoint pairs",
    )
    group.add_argument("--compare-model", default=env("PREFLOOP_COMPARE_MODEL"), help="the served model's name")
    group.add_argument(
        "--compare-timeout",
        type=float,
        default=env_number(parser, "PREFLOOP_COMPARE_TIMEOUT", 60.0, float),
        help="seconds one answer of the served model may take",
    )
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default=env_choice(parser, "PREFLOOP_ENGINE", ENGINES, "local"),
        help="local: transformers in this process; vllm: vLLM on a CUDA GPU (versions as LoRA adapters)",
    )


def check_app_args(parser: argparse.ArgumentParser, args: argparse.Namespace, default_guidelines: str) -> None:
    """parser.error (exit 2, one line naming the flag) on a number out of its range, a --guidelines file that is not
    there, or a variable the app reads later that is no yes/no or choice: before the store or the model loads."""
    for flag, (variable, allowed, what) in LIMITS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if not allowed(value):  # NaN fails every comparison
            parser.error(f"{flag} (or {variable}) must be {what}, not {value}")
    if args.queue_size < (0 if is_postgres(args.db) else 1):  # 0: other app processes on the store make the pairs
        parser.error(
            f"--queue-size (or PREFLOOP_QUEUE_SIZE) must be ≥ 1 ready pairs (0 only with a PostgreSQL --db, where "
            f"another app process makes them), not {args.queue_size}"
        )
    if args.guidelines is None:  # not asked for: the default file, if there is one
        args.guidelines = default_guidelines
    elif not Path(args.guidelines).is_file():
        parser.error(f"--guidelines (or PREFLOOP_GUIDELINES): no such file: {args.guidelines}")
    share = env_number(parser, "PREFLOOP_VLLM_GPU_MEMORY", None, float)  # create_engine reads it (vllm)
    if share is not None and not 0 < share <= 1:
        parser.error(f"PREFLOOP_VLLM_GPU_MEMORY must be a share of the GPU memory in (0, 1], not {share}")
    env_yes_no(parser, "PREFLOOP_ALLOW_TRAINING")  # read while running (TrainingSwitch): refused now, not ignored
    env_choice(parser, "PREFLOOP_DEVICE", DEVICES, "auto")


def check_deploy_args(parser: argparse.ArgumentParser, args: argparse.Namespace, default_strategies) -> None:
    """parser.error (exit 2) on combinations that cannot work; a served model adds 'endpoint' to the defaults."""
    from storage.backup import MAX_BACKUP_EVERY_S  # here: storage.backup imports pyarrow (0.2 s)

    if not (0 < args.backup_every <= MAX_BACKUP_EVERY_S):  # also NaN (no comparison holds) and inf
        parser.error(
            f"--backup-every must be a number of seconds in (0, {MAX_BACKUP_EVERY_S:,}], not {args.backup_every}"
        )
    if args.backup_hub_repo and not args.backup_dir:
        parser.error("--backup-hub-repo needs --backup-dir (the local folder the Hub repo mirrors)")
    if args.backup_dir and is_postgres(getattr(args, "db", "")):
        parser.error("--backup-dir backs up a DuckDB file; back up a PostgreSQL store with PostgreSQL (pg_dump)")
    if args.compare_endpoint and not args.compare_model:
        parser.error("--compare-endpoint needs --compare-model (the name the server gives the model)")
    if args.compare_endpoint and not args.compare_endpoint.startswith(("http://", "https://")):
        parser.error(f"--compare-endpoint must start with http:// or https://, not {args.compare_endpoint!r}")
    if "endpoint" in (args.strategy or ()) and not args.compare_endpoint:
        parser.error("--strategy endpoint needs --compare-endpoint URL and --compare-model NAME")
    if args.compare_endpoint and not args.strategy:
        args.strategy = [*default_strategies, "endpoint"]


def is_new_database(db: str) -> bool:
    """True before the store creates the file (":memory:" counts as new: there is nothing to lose)."""
    return db == ":memory:" or (not is_postgres(db) and not Path(db).exists())


def open_backups(args: argparse.Namespace, store, new_db: bool):
    """labeling.backups.start_backups with the app's flags; None without --backup-dir. Exits on BackupStartError."""
    if not args.backup_dir:
        return None
    from labeling.backups import BackupStartError, start_backups

    try:
        return start_backups(
            store,
            args.backup_dir,
            new_db=new_db,
            runs_dir=args.runs_dir,
            every_s=args.backup_every,
            hub_repo=args.backup_hub_repo,
        )
    except BackupStartError as exc:
        store.close()
        sys.exit(f"error: {exc}")


def create_engine(args: argparse.Namespace):
    """The generation engine the flags ask for (both have the same interface for the queue and the services)."""
    if args.engine == "vllm":
        from generation.vllm_engine import VLLMEngine

        share = os.environ.get("PREFLOOP_VLLM_GPU_MEMORY")  # e.g. 0.5: leaves the rest to a training child
        return VLLMEngine(
            args.model, cache_dir=args.model_cache, **({"gpu_memory_utilization": float(share)} if share else {})
        )
    from generation.engine import GenerationEngine

    return GenerationEngine(args.model, cache_dir=args.model_cache, threads=args.engine_threads)


def create_compare_side(args: argparse.Namespace):
    """The served model of 'endpoint' pairs (labeling.endpoint_pairs.EndpointSide), or None. The API key, if the
    server wants one, comes from PREFLOOP_COMPARE_API_KEY (never a flag: it would show in the process list)."""
    if not args.compare_endpoint:
        return None
    from generation.backends import OpenAICompatibleBackend
    from labeling.endpoint_pairs import EndpointSide

    backend = OpenAICompatibleBackend(
        args.compare_endpoint,
        args.compare_model,
        api_key=os.environ.get("PREFLOOP_COMPARE_API_KEY"),
        timeout=args.compare_timeout,
    )
    return EndpointSide(backend)


ALLOW_TRAINING_SETTING = "allow_training_on_cpu_space"  # app_settings key an admin's toggle sets ("1" / "0")


class TrainingSwitch:
    """Whether this process may train. A Hugging Face Space on CPU hardware labels only, unless an admin turns
    training on (the Train tab's toggle, stored in app_settings, so a restart keeps it) or the Space sets the
    variable PREFLOOP_ALLOW_TRAINING=1. Everywhere else training is always on."""

    def __init__(self, store, cpu_space: bool):
        self.store, self.cpu_space = store, cpu_space

    def blocked(self) -> str | None:
        """None when training may start; else why not and how to turn it on."""
        if not self.cpu_space or self.allowed_by_env() or self.store.get_setting(ALLOW_TRAINING_SETTING) == "1":
            return None
        return (
            "Training is off on this CPU Space: labeling works as usual, and a run would take the CPU from the "
            "people labeling (minutes per run on 2 vCPUs). An admin can turn it on here, or set the Space variable "
            "PREFLOOP_ALLOW_TRAINING=1, or move the Space to GPU hardware."
        )

    def set_allowed(self, on: bool) -> None:
        self.store.set_setting(ALLOW_TRAINING_SETTING, "1" if on else "0")

    @staticmethod
    def allowed_by_env() -> bool:
        return YES_NO.get(os.environ.get("PREFLOOP_ALLOW_TRAINING", "").strip().lower(), False)


def on_cpu_space(engine) -> bool:
    """Running as a Space (SPACE_ID) on CPU hardware: SPACE_HARDWARE when set (e.g. "cpu-basic", "t4-small"; a
    Space variable the owner may set), else where the engine runs (models/device.py pick_placement)."""
    if not os.environ.get("SPACE_ID"):
        return False
    hardware = os.environ.get("SPACE_HARDWARE", "").strip().lower()
    if hardware:
        return hardware.startswith("cpu")
    placement = getattr(engine, "placement", None)
    return getattr(placement, "device", "cpu") == "cpu"

"""The shared layer of the training child (`python -m training METHOD ...`): the config base and the child's main.

Every method module (dpo, reward, ppo, score) has a config dataclass subclassing :class:`CommonConfig` and a thin
``main(argv=None) -> int`` that calls :func:`run_method` with its ``train(cfg, writer, cancel) -> dict``.
The rest of the child: training.configparse (flags and YAML), training.data (rows, held-out split),
training.progress (progress.jsonl, the Trainer callback), training.modeling (model, LoRA, Trainer arguments).
Torch, transformers and peft are imported inside the functions that need them, so ``--help`` and config errors
are fast and these modules are importable without them.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from training.configparse import ConfigError, flag_names, out_dir_hint, parse_config
from training.data import DATA_SUFFIXES, DataError
from training.files import json_safe, write_json, write_text_atomic
from training.parent_adapter import adopt_parent_lora
from training.progress import ProgressWriter, is_main_process
from training.run_folder import finished_run, optimizer_steps

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"


@dataclass
class CommonConfig:
    """Fields every method shares. Defaults are conservative for ~50-500 pairs on a 135M model on CPU."""

    continues_adapter: ClassVar[bool] = True  # init_adapter is the adapter trained on (not so for a reward model)
    data: str = field(default="", metadata={"help": "training data file (.jsonl, .json or .parquet); required"})
    out: str = field(
        default="",
        metadata={
            "help": "run folder for progress.jsonl, adapter/, metrics; required. A folder where a run ended is "
            "refused: repeat a run with --config RUN_DIR/run.yaml --out NEW_DIR"
        },
    )
    base_model: str = field(default="bundled", metadata={"help": "'bundled', a local model folder or a hub id"})
    model_cache: str = field(default="data/models", metadata={"help": "folder where the bundled model is converted"})
    init_adapter: str | None = field(
        default=None, metadata={"help": "PEFT adapter folder to continue training from (none = a fresh LoRA)"}
    )
    base_version: int = field(default=0, metadata={"help": "model version id this run starts from (for the record)"})
    seed: int = field(default=42, metadata={"help": "random seed (LoRA init, data order, sampling)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = run `epochs` epochs"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data when max_steps is -1"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak AdamW learning rate"})
    batch_size: int = field(default=4, metadata={"help": "examples per device per step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int = field(
        default=256,
        metadata={
            "help": "max tokens of prompt + answer: a longer row keeps its start, so the answer's end is cut off; a "
            "row whose prompt alone has max_length tokens or more is dropped (train_rows / dropped_rows in the "
            "metrics; the run fails when no row is left)"
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "comma-separated module names, or 'all-linear'"}
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "share of rows held out for evaluation, whole prompts at a time: as near it as whole prompts "
            "allow (at most twice it; the log says when none could be); nothing under 4 rows (0 = none)"
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "trade compute for memory (TRL defaults to true; small models don't need it)"}
    )
    warmup_steps: float = field(default=0.0, metadata={"help": "LR warmup: steps, or a fraction in [0, 1) of all"})
    before_after_prompts: int = field(
        default=4, metadata={"help": "held-out prompts answered by parent and new model after training (0 = skip)"}
    )
    before_after_max_new_tokens: int = field(
        default=128, metadata={"help": "answer length cap for the before/after samples"}
    )
    before_after_temperature: float = field(
        default=0.7, metadata={"help": "sampling temperature of the before/after samples shown side by side"}
    )

    def validate(self) -> None:
        """Range and file checks; subclasses extend with `super().validate()`. Raises ConfigError."""
        _require(bool(self.data), "data", "is required (--data FILE)")
        _require(bool(self.out), "out", "is required (--out RUN_DIR)")
        path = Path(self.data)
        _require(path.is_file(), "data", f"file {self.data} does not exist")
        _require(path.suffix.lower() in DATA_SUFFIXES, "data", f"{self.data}: use one of {', '.join(DATA_SUFFIXES)}")
        if self.init_adapter:
            adapter = Path(self.init_adapter)
            _require((adapter / "adapter_config.json").is_file(), "init_adapter", f"{adapter} is no PEFT adapter")
        _require(self.learning_rate > 0, "learning_rate", f"must be above 0 (got {self.learning_rate})")
        _require(self.max_steps == -1 or self.max_steps >= 1, "max_steps", f"must be -1 or ≥ 1 (got {self.max_steps})")
        _require(self.epochs > 0, "epochs", f"must be above 0 (got {self.epochs})")
        for name in ("batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha"):
            _require(getattr(self, name) >= 1, name, f"must be ≥ 1 (got {getattr(self, name)})")
        _require(self.max_length >= 16, "max_length", f"must be ≥ 16 tokens (got {self.max_length})")
        _require(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1) (got {self.lora_dropout})")
        _require(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1) (got {self.eval_fraction})")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be ≥ 0 (got {self.warmup_steps})")
        _require(
            self.warmup_steps < 1 or float(self.warmup_steps).is_integer(),
            "warmup_steps",
            f"a step count (≥ 1) is a whole number, a fraction of all steps is below 1 (got {self.warmup_steps})",
        )
        _check_base_model(self.base_model)
        _require(self.before_after_prompts >= 0, "before_after_prompts", "must be ≥ 0")
        _require(self.before_after_max_new_tokens >= 1, "before_after_max_new_tokens", "must be ≥ 1")
        _require(self.before_after_temperature > 0, "before_after_temperature", "must be above 0")
        _require(bool(self.lora_target_modules.strip()), "lora_target_modules", "must name modules or 'all-linear'")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_base_model(spec: str) -> None:
    """'bundled', a saved model folder, or something that can be a hub id: checked before any data is read."""
    if spec == "bundled":
        return
    path = Path(spec)
    if path.exists():
        _require((path / "config.json").is_file(), "base_model", f"{spec} holds no config.json (no saved model)")
        return
    looks_like_path = path.is_absolute() or spec.startswith((".", "~")) or "\\" in spec or spec.count("/") > 1
    _require(not looks_like_path, "base_model", f"folder {spec} does not exist")
    _require(bool(HUB_ID.fullmatch(spec)), "base_model", f"{spec!r} is neither 'bundled', a folder nor a hub id")


# ---- the child's main ----------------------------------------------------------------------------------
TrainFn = Callable[[Any, ProgressWriter, threading.Event], dict]


def run_method(config_cls: type[CommonConfig], train_fn: TrainFn, argv: list[str] | None = None) -> int:
    """Parse, run `train_fn(cfg, writer, cancel)`, write metrics.json and the `end` line. Returns the exit code.

    RUN_DIR/run.yaml is (re)written first with every resolved field: the runner's run.yaml (the usual `--config`)
    gains the defaults, so one file records what ran (with `init_adapter`, the parent's LoRA shape: see
    training/parent_adapter.py), and `--config RUN_DIR/run.yaml --out NEW_DIR` repeats the run. A folder where a run
    ended (an end line, an adapter) is refused untouched: its version's adapter and record stay as registered.
    0: succeeded or cancelled (SIGTERM: stop at the next step, keep what is done; a Cancel that came after the
    result was saved, `cancelled_after_saving` in the metrics, ends succeeded); 1: training failed (also a run
    that took no optimizer step); 2: bad config (nothing trained).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(config_cls, argv)
        if finished := finished_run(cfg.out):
            raise ConfigError(
                f"out: {cfg.out} holds {finished}; a new run needs a new folder (to repeat that run: "
                f"--config {Path(cfg.out) / 'run.yaml'} --out NEW_DIR)"
            )
        notes = adopt_parent_lora(cfg, flag_names(config_cls, argv))
    except ConfigError as exc:
        out = out_dir_hint(argv)
        if out and not finished_run(out):  # never append to the record of a run that ended
            ProgressWriter(out).end("failed", {}, error=f"bad config: {exc}")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_text_atomic(out / "run.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=True))
    writer = ProgressWriter(out)
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.set())
    try:
        metrics = json_safe(train_fn(cfg, writer, cancel) or {})
        if not cancel.is_set() and not optimizer_steps(metrics):
            raise DataError("the run took no optimizer step: nothing was trained, so no model is saved as a result")
    except Exception as exc:  # reported in progress.jsonl and the log; the runner marks the run failed
        if not isinstance(exc, DataError | ConfigError):
            traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DataError | ConfigError) else str(exc)
        writer.end("failed", {}, error=message)
        print(f"error: {message}", file=sys.stderr)
        return 1
    # a Cancel after the result was saved (a reward model scoring the stored answers) keeps the run: succeeded
    status = "cancelled" if cancel.is_set() and not metrics.get("cancelled_after_saving") else "succeeded"
    if is_main_process():
        write_json(out / "metrics.json", metrics)
    writer.end(status, metrics)
    return 0

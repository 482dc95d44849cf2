"""The shared layer of the training child (`python -m training METHOD ...`): config, progress, model loading.

Every method module (dpo, reward, ppo, score) has a config dataclass subclassing :class:`CommonConfig` and a thin
``main(argv=None) -> int`` that calls :func:`run_method` with its ``train(cfg, writer, cancel) -> dict``.
Torch, transformers and peft are imported inside the functions that need them, so ``--help`` and config errors
are fast and this module is importable without them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.configparse import ConfigError, out_dir_hint, parse_config

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """The data file is unreadable or has the wrong shape; str() names the file (and line)."""


@dataclass
class CommonConfig:
    """Fields every method shares. Defaults are conservative for ~50-500 pairs on a 135M model on CPU."""

    data: str = field(default="", metadata={"help": "training data file (.jsonl, .json or .parquet); required"})
    out: str = field(default="", metadata={"help": "run folder for progress.jsonl, adapter/, metrics; required"})
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
    max_length: int = field(default=256, metadata={"help": "max tokens of prompt + answer (longer is truncated)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "comma-separated module names, or 'all-linear'"}
    )
    eval_fraction: float = field(
        default=0.0, metadata={"help": "share of rows held out for evaluation (0 = no eval split)"}
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
        _require(path.suffix in DATA_SUFFIXES, "data", f"{self.data}: use one of {', '.join(DATA_SUFFIXES)}")
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
        _require(self.before_after_prompts >= 0, "before_after_prompts", "must be ≥ 0")
        _require(self.before_after_max_new_tokens >= 1, "before_after_max_new_tokens", "must be ≥ 1")
        _require(self.before_after_temperature > 0, "before_after_temperature", "must be above 0")
        _require(bool(self.lora_target_modules.strip()), "lora_target_modules", "must name modules or 'all-linear'")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ---- progress ------------------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None (JSON has no NaN), tensors and numpy scalars become numbers."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def is_main_process() -> bool:
    """Rank 0 (or a single process): only it writes progress, metrics and the adapter."""
    return int(os.environ.get("RANK", "0")) == 0


class ProgressWriter:
    """Appends one JSON object per line to RUN_DIR/progress.jsonl (flushed and fsynced), and echoes it to stdout."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "progress.jsonl"
        self.enabled = is_main_process()
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> dict:
        line = {"event": event, "time": round(time.time(), 3), **_clean(fields)}
        if not self.enabled:
            return line
        text = json.dumps(line, ensure_ascii=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(text + "\n")
                out.flush()
                os.fsync(out.fileno())
        print(f"[{event}] {text}", flush=True)
        return line

    def start(self, total: int) -> dict:
        return self.write("start", total=total)

    def progress(self, **fields: Any) -> dict:
        return self.write("progress", **fields)

    def eval(self, **fields: Any) -> dict:
        return self.write("eval", **fields)

    def end(self, status: str, metrics: dict, error: str | None = None) -> dict:
        return self.write("end", status=status, metrics=metrics, error=error)


DPO_RENAME = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}
PPO_RENAME = {
    "objective/rlhf_reward": "reward", "objective/kl": "kl", "loss/policy_avg": "policy_loss",
    "loss/value_avg": "value_loss", "policy/clipfrac_avg": "clip_fraction", "policy/entropy_avg": "entropy",
}  # fmt: skip


class _ProgressLogic:
    """Trainer logs → progress/eval lines; a set `cancel` event stops training at the end of the current step.

    Used as `ProgressCallback`, the same class mixed with transformers.TrainerCallback (built on first use, so
    parsing a config and reporting its errors never waits for torch to import).
    """

    def __init__(self, writer: ProgressWriter, cancel: threading.Event, rename: dict[str, str] | None = None):
        self.writer = writer
        self.cancel = cancel
        self.rename = dict(rename or {})
        self.started = time.monotonic()
        self.last: dict = {}  # the newest progress line (final metrics read it)
        self.last_eval: dict = {}
        self.summary: dict = {}  # the Trainer's closing log (train_runtime, train_loss, ...)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        if state.is_world_process_zero:
            self.writer.start(total=state.max_steps)
        control.should_training_stop = self.cancel.is_set()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if not state.is_world_process_zero:
            return control
        if "train_runtime" in logs:
            self.summary = _clean(logs)
            return control
        step, total = state.global_step, state.max_steps
        elapsed = time.monotonic() - self.started
        eta = elapsed / step * (total - step) if step else None
        base = {"step": step, "total": total, "epoch": state.epoch}
        if any(key.startswith("eval_") for key in logs):
            fields = {self._name(key.removeprefix("eval_")): value for key, value in logs.items()}
            self.last_eval = self.writer.eval(**{**fields, **base})  # our step/total/epoch win over the log's
            return control
        fields = {new: logs[old] for old, new in self.rename.items() if old in logs}
        timing = {"elapsed": round(elapsed, 2), "eta": round(eta, 2) if eta is not None else None}
        line = {**fields, **base, "loss": logs.get("loss"), "learning_rate": logs.get("learning_rate"), **timing}
        self.last = self.writer.progress(**line)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.cancel.is_set():
            control.should_training_stop = True
        return control

    def _name(self, key: str) -> str:
        return self.rename.get(key, key)


def __getattr__(name: str):
    """PEP 562: `ProgressCallback` = _ProgressLogic + transformers.TrainerCallback, created when first imported."""
    if name != "ProgressCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import TrainerCallback

    cls = type("ProgressCallback", (_ProgressLogic, TrainerCallback), {"__module__": __name__})
    globals()["ProgressCallback"] = cls
    return cls


# ---- the child's main ----------------------------------------------------------------------------------
TrainFn = Callable[[Any, ProgressWriter, threading.Event], dict]


def run_method(config_cls: type[CommonConfig], train_fn: TrainFn, argv: list[str] | None = None) -> int:
    """Parse, run `train_fn(cfg, writer, cancel)`, write metrics.json and the `end` line. Returns the exit code.

    0: succeeded or cancelled (SIGTERM: stop at the next step, keep what is done); 1: training failed;
    2: bad config (nothing trained).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(config_cls, argv)
    except ConfigError as exc:
        out = out_dir_hint(argv)
        if out:
            ProgressWriter(out).end("failed", {}, error=f"bad config: {exc}")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_text_atomic(out / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=True))
    writer = ProgressWriter(out)
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.set())
    try:
        metrics = _clean(train_fn(cfg, writer, cancel) or {})
    except Exception as exc:  # reported in progress.jsonl and the log; the runner marks the run failed
        if not isinstance(exc, DataError | ConfigError):
            traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DataError | ConfigError) else str(exc)
        writer.end("failed", {}, error=message)
        print(f"error: {message}", file=sys.stderr)
        return 1
    status = "cancelled" if cancel.is_set() else "succeeded"
    if is_main_process():
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    writer.end(status, metrics)
    return 0


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_text_atomic(Path(path), json.dumps(_clean(data), indent=2, ensure_ascii=False))


# ---- data ----------------------------------------------------------------------------------------------
def load_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl / .json (a list of objects) / .parquet file. DataError names the file and line."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    elif path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    else:
        raise DataError(f"{path}: unknown data file type (use {', '.join(DATA_SUFFIXES)})")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a list of objects (one row each)")
    if not rows:
        raise DataError(f"{path}: holds no rows")
    return rows


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) with a seeded shuffle; eval is empty when the fraction is 0 or leaves it under one row."""
    import random

    n_eval = int(len(rows) * eval_fraction)
    if n_eval < 1:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ---- models --------------------------------------------------------------------------------------------
def quiet_progress_bars() -> None:
    """No tqdm bars from transformers/datasets in log.txt (progress.jsonl is the progress record)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer_for_training(cfg: CommonConfig, padding_side: str = "left"):
    from models.loading import load_tokenizer

    return load_tokenizer(cfg.base_model, cfg.model_cache, padding_side=padding_side)


def load_model_for_training(cfg: CommonConfig, kind: str = "causal"):
    """(model, tokenizer) on no particular device (the Trainer places it).

    kind "causal": AutoModelForCausalLM; with `cfg.init_adapter` it is a PeftModel continuing from that adapter
    (trainable), else the plain base (wrap it with `lora_config`). kind "seq_cls": AutoModelForSequenceClassification
    with one output (a reward/value head), pad_token_id set; `init_adapter` is not applied (the caller decides).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    from models.device import training_dtype_name
    from models.loading import resolve_model

    quiet_progress_bars()
    set_seed(cfg.seed)  # the LoRA A init and any head init are then reproducible
    path = resolve_model(cfg.base_model, cfg.model_cache)
    tokenizer = load_tokenizer_for_training(cfg)
    dtype = getattr(torch, training_dtype_name())
    if kind == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    if kind != "causal":
        raise ValueError(f"kind must be 'causal' or 'seq_cls', not {kind!r}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    return model, tokenizer


def lora_config(cfg: CommonConfig, task_type: str = "CAUSAL_LM", **extra: Any):
    """peft.LoraConfig from the config's lora_* fields (extra kwargs, e.g. modules_to_save, pass through)."""
    from peft import LoraConfig

    names = cfg.lora_target_modules.strip()
    targets: str | list[str] = names if names == "all-linear" else [n.strip() for n in names.split(",") if n.strip()]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type=task_type, bias="none", **extra)  # fmt: skip


def trainer_args_kwargs(cfg: CommonConfig) -> dict:
    """TrainingArguments kwargs every method shares; the device/dtype choice comes from models.loading."""
    from models.device import pick_placement

    placement = pick_placement()
    on_gpu = placement.device != "cpu"
    return {
        "output_dir": str(Path(cfg.out) / "trainer"),
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "max_steps": cfg.max_steps,
        "num_train_epochs": cfg.epochs,
        "learning_rate": cfg.learning_rate,
        "warmup_steps": cfg.warmup_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "activation_checkpointing": cfg.gradient_checkpointing,  # the new name of gradient_checkpointing
        "use_cpu": not on_gpu,
        "bf16": on_gpu and placement.dtype_name == "bfloat16",
        "fp16": on_gpu and placement.dtype_name == "float16",
        "disable_tqdm": True,  # progress.jsonl and the echoed lines replace the bar (no \r noise in log.txt)
        "dataloader_num_workers": 0,
    }


def save_adapter(model, tokenizer, out_dir: str | Path) -> Path:
    """The trained adapter (only "default", not TRL's frozen "ref" copy) + tokenizer, loadable with
    `PeftModel.from_pretrained(base, out_dir)`."""
    out_dir = Path(out_dir)
    if not is_main_process():
        return out_dir
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if hasattr(model, "peft_config") and "default" in model.peft_config:
        model.save_pretrained(out_dir, selected_adapters=["default"])
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

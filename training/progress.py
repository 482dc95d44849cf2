"""The progress record of a training child: RUN_DIR/progress.jsonl lines and the Trainer callback that writes them.

Line contract (read by training/runner.py and the Train tab): `start` (total), `progress` (step, total, epoch, loss,
learning_rate, elapsed, eta and the method's renamed metrics), `eval` (held-out metrics at a step), `end` (status,
metrics, error). Light imports only: transformers is imported when a callback class is first built.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from training.files import json_safe, write_jsonl


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
        line = {"event": event, "time": round(time.time(), 3), **json_safe(fields)}
        if not self.enabled:
            return line
        with self._lock:
            write_jsonl(self.path, [line], append=True)
        print(f"[{event}] {json.dumps(line, ensure_ascii=False)}", flush=True)
        return line

    def start(self, total: int) -> dict:
        return self.write("start", total=total)

    def progress(self, **fields: Any) -> dict:
        return self.write("progress", **fields)

    def eval(self, **fields: Any) -> dict:
        return self.write("eval", **fields)

    def end(self, status: str, metrics: dict, error: str | None = None) -> dict:
        return self.write("end", status=status, metrics=metrics, error=error)


class ProgressLogic:
    """Trainer logs → progress/eval lines; a set `cancel` event stops training at the end of the current step.

    Trainers need it mixed with transformers.TrainerCallback: `ProgressCallback` (this class) or
    `trainer_callback(SubclassOfThis)`, built on first use, so parsing a config and reporting its errors never
    waits for torch to import.
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
            self.summary = json_safe(logs)
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


@functools.cache
def eval_metrics(progress: ProgressLogic) -> dict:
    """The last held-out evaluation's figures as eval_<name> metrics (none when nothing was held out)."""
    return {f"eval_{k}": v for k, v in progress.last_eval.items() if k not in ("event", "time")}


def trainer_callback(logic: type[ProgressLogic]) -> type:
    """`logic` mixed with transformers.TrainerCallback (imported now, not when this module is)."""
    from transformers import TrainerCallback

    name = logic.__name__.removesuffix("Logic") + "Callback"
    return type(name, (logic, TrainerCallback), {"__module__": logic.__module__})


def __getattr__(name: str):
    """PEP 562: `ProgressCallback` = ProgressLogic + transformers.TrainerCallback, created when first imported."""
    if name != "ProgressCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return trainer_callback(ProgressLogic)

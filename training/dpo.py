"""LoRA DPO: `python -m training dpo --data SNAPSHOT --out RUN_DIR [--config run.yaml] [--flags]`.

The reference model is never a second copy of the weights:
- a fresh LoRA (no `init_adapter`): TRL wraps the base with our LoraConfig and computes the reference with the
  adapter disabled, i.e. the reference is the base model;
- continuing from an adapter version (`init_adapter`): the policy is that adapter, loaded trainable. TRL 1.12 with
  peft ≥ 0.20 then adds a frozen copy of it named "ref" and computes the reference through that copy, so the
  reference is the parent version (what DPO's KL anchor should be); only "default" is trained and saved.
Reads only the snapshot file; never opens the DuckDB database.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from training.before_after import run_before_after
from training.common import CommonConfig, run_method
from training.configparse import ConfigError
from training.data import DataError, check_styles, kept_rows, load_rows, split_rows
from training.modeling import load_model_for_training, lora_config, save_adapter, trainer_args_kwargs
from training.progress import ProgressWriter, eval_metrics, is_main_process

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down")
DPO_RENAME = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}


@dataclass
class PrefDPOConfig(CommonConfig):
    """LoRA DPO on preference pairs (prompt, chosen, rejected).

    Defaults differ from TRL's DPOConfig on purpose (small data, LoRA, CPU): learning_rate 1e-3 (TRL's 1e-6 is
    for full fine-tuning; a zero-initialised LoRA B needs far more) at full rate for runs of up to full_rate_steps
    16 optimizer steps and scaled by 16 / steps beyond, epochs 3 (as TRL), beta 0.1 (same), LoRA r 8 /
    alpha 16, batch_size 4 (TRL 8), max_length 256 (TRL 1024), logging every step (TRL 10), gradient
    checkpointing off (TRL on), bf16 only on a bf16 GPU (TRL always), lora_dropout 0 (TRL turns dropout off in
    DPO anyway; a nonzero value here keeps it on).

    Measured with bench/dpo_defaults.py (bundled SmolLM2-135M, 60 self-generated pairs, the longer answer chosen,
    batch 8, 8 held-out prompts): lr 2e-4 × 2 epochs moved answers from 112.5 to 123.5 words on average with
    KL(new ‖ base) 0.43 nats per answer, still on topic; the issue's lr 5e-4 × 3 epochs reached KL 6.6 nats
    per answer (15× more; 134 words, drifting off the question). On other data lr 5e-5 × 2 epochs barely
    moved the model (KL 0.01 nats per answer). The 64 votes of a bench/loop.py run give 15–28 pairs, 8–14 steps:
    there lr 2e-4 barely moved the model (KL 0.03–0.3 nats), and with the repetition penalty in generation lr 1e-3
    moved it the way the votes point without adding loops (bench/README.md "Does the loop move the model?"). The
    step budget bounds lr × steps at 1e-3 × 16, so a run on a thousand pairs (500 steps) does not go 30× as far;
    that bound is of the order of the drifting run above (5e-4 × 23 steps, without the penalty), so the
    before/after panel's KL stays the check before a version is activated. Epochs 3 (2 until 2026-11-26): on fresh
    votes with one Start each, *example* went from 55 % to 87 % [68, 96] and *list* stayed at 87–88 %, 0 % degenerate,
    373–452 s from the click to the version (bench/README.md "A third epoch").
    """

    method_name: ClassVar[str] = "dpo"
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (TRL: 1e-6)"})
    full_rate_steps: int = field(
        default=16,
        metadata={
            "help": "the learning rate applies in full for runs of up to this many optimizer steps; a longer run "
            "has it scaled by full_rate_steps / steps, so more pairs do not push the model further (0 = off)"
        },
    )
    epochs: float = field(default=3.0, metadata={"help": "passes over the pairs when max_steps is -1 (TRL: 3)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (0 keeps DPO exact)"})
    beta: float = field(default=0.1, metadata={"help": "DPO beta: higher keeps the policy closer to the reference"})
    loss_type: str = field(default="sigmoid", metadata={"help": f"DPO loss: {', '.join(LOSS_TYPES)}"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "label noise for the 'robust' loss, in [0, 0.5); refused with any other loss"}
    )
    sft_weight: float = field(
        default=0.0, metadata={"help": "weight of an SFT term (NLL of the chosen answers) added to the loss; 0 = off"}
    )

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise ConfigError(f"beta: must be above 0 (got {self.beta})")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type: {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5) (got {self.label_smoothing})")
        if self.label_smoothing and self.loss_type != "robust":
            raise ConfigError(
                f"label_smoothing: only the 'robust' loss uses it; loss_type {self.loss_type!r} would ignore "
                f"{self.label_smoothing} (use --loss-type robust, or leave label_smoothing at 0)"
            )
        if self.sft_weight < 0:
            raise ConfigError(f"sft_weight: must be ≥ 0 (got {self.sft_weight})")
        if self.full_rate_steps < 0:
            raise ConfigError(f"full_rate_steps: must be ≥ 0 (got {self.full_rate_steps})")


def planned_steps(cfg: PrefDPOConfig, rows: int) -> int:
    """The optimizer steps the trainer will take for `rows` pairs (as transformers' Trainer counts them)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    batches = math.ceil(rows / (cfg.batch_size * processes))
    return max(1, math.ceil(math.ceil(batches / cfg.gradient_accumulation_steps) * cfg.epochs))  # Trainer rounds up


def scaled_learning_rate(cfg: PrefDPOConfig, rows: int) -> float:
    """cfg.learning_rate, times full_rate_steps / steps for a run longer than full_rate_steps steps."""
    steps = planned_steps(cfg, rows)
    if cfg.full_rate_steps and steps > cfg.full_rate_steps:
        return cfg.learning_rate * cfg.full_rate_steps / steps
    return cfg.learning_rate


def check_pairs(rows: list[dict], path: str) -> None:
    """Every row needs a prompt and a non-empty chosen and rejected answer, all in one style (text or chat), the
    same in every row."""
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("prompt", "chosen", "rejected") if not row.get(key)]
        if missing:
            raise DataError(
                f"{path}, row {number}: missing or empty {', '.join(missing)} (need prompt, chosen, rejected)"
            )
    check_styles(rows, ("prompt", "chosen", "rejected"), path)


def train(cfg: PrefDPOConfig, writer: ProgressWriter, cancel: threading.Event) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from training.progress import ProgressCallback

    rows = load_rows(cfg.data)
    check_pairs(rows, cfg.data)
    train_rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    model, tokenizer = load_model_for_training(cfg, "causal")
    continued = bool(cfg.init_adapter)
    learning_rate = scaled_learning_rate(cfg, len(train_rows))
    if learning_rate != cfg.learning_rate:
        print(
            f"learning rate {learning_rate:.3g} ({cfg.learning_rate:g} × {cfg.full_rate_steps} / "
            f"{planned_steps(cfg, len(train_rows))} steps: full_rate_steps)",
            flush=True,
        )
    args = DPOConfig(
        **{**trainer_args_kwargs(cfg), "learning_rate": learning_rate},
        beta=cfg.beta,
        loss_type=[cfg.loss_type] + (["sft"] if cfg.sft_weight else []),
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None,
        label_smoothing=cfg.label_smoothing,
        max_length=cfg.max_length,
        disable_dropout=cfg.lora_dropout == 0,
        eval_strategy="epoch" if eval_rows else "no",
    )
    progress = ProgressCallback(writer, cancel, rename=DPO_RENAME)
    trainer = DPOTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        peft_config=None if continued else lora_config(cfg),
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # progress lines are echoed by the writer already
    kept = kept_rows(trainer, len(train_rows), len(eval_rows), cfg.max_length, cfg.data)
    trainer.train()
    adapter_dir = save_adapter(trainer.model, tokenizer, Path(cfg.out) / "adapter")
    metrics = {**summarize(cfg, trainer.state.global_step, progress, len(train_rows), len(eval_rows)), **kept}
    metrics["learning_rate"] = learning_rate
    if not cancel.is_set() and cfg.before_after_prompts > 0 and is_main_process():
        del trainer, model  # free the training copy before loading the base again for sampling
        panel = run_before_after(cfg, adapter_dir, rows, cancel)
        if panel is not None:  # None: cancelled while sampling
            metrics["before_after"] = panel
    return metrics


def summarize(cfg: PrefDPOConfig, steps: int, progress, n_train: int, n_eval: int) -> dict:
    last = progress.last
    metrics = {
        "method": "dpo",
        "steps": steps,
        "train_rows": n_train,
        "eval_rows": n_eval,
        "loss": last.get("loss"),
        "reward_accuracy": last.get("reward_accuracy"),
        "reward_margin": last.get("reward_margin"),
        "train_loss": progress.summary.get("train_loss"),
        "train_runtime": progress.summary.get("train_runtime"),
        "base_version": cfg.base_version,
        "continued_from": cfg.init_adapter,
        "reference": "parent adapter (frozen copy)" if cfg.init_adapter else "base model (adapter disabled)",
    }
    return {**metrics, **eval_metrics(progress)}


def main(argv: list[str] | None = None) -> int:
    return run_method(PrefDPOConfig, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())

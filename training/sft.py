"""LoRA SFT: `python -m training sft --data SNAPSHOT --out RUN_DIR [--config run.yaml] [--flags]`.

Supervised fine-tuning (TRL `SFTTrainer`) on (prompt, completion) rows: the `sft` export, i.e. every edited answer,
else the clear winner of a judgement (storage/exporters.py). The loss is on the answer tokens only. A fresh LoRA
on the base, or training continues from the serving version's adapter (`init_adapter`). `fit` is also the first
stage of SFT-then-DPO (training/sft_dpo.py). Reads only the snapshot file; never opens the DuckDB database.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from training.before_after import run_before_after
from training.common import CommonConfig, run_method
from training.data import DataError, check_styles, kept_rows, load_rows, split_rows
from training.modeling import load_model_for_training, lora_config, save_adapter, trainer_args_kwargs
from training.progress import ProgressWriter, eval_metrics, is_main_process

SFT_RENAME = {"mean_token_accuracy": "token_accuracy", "entropy": "entropy"}


@dataclass
class PrefSFTConfig(CommonConfig):
    """LoRA SFT on (prompt, completion) rows, loss on the completion only.

    Defaults: learning_rate 2e-4 (TRL's 2e-5 is for full fine-tuning), epochs 2, LoRA r 8 / alpha 16 / dropout 0,
    batch_size 4, max_length 256 (TRL 1024), no packing.
    """

    method_name: ClassVar[str] = "sft"
    learning_rate: float = field(default=2e-4, metadata={"help": "peak AdamW learning rate (TRL: 2e-5)"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the rows when max_steps is -1 (TRL: 3)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})


def check_completions(rows: list[dict], path: str) -> None:
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("prompt", "completion") if not row.get(key)]
        if missing:
            raise DataError(f"{path}, row {number}: missing or empty {', '.join(missing)} (need prompt, completion)")
    check_styles(rows, ("prompt", "completion"), path)


def fit(
    cfg: CommonConfig,
    rows: list[dict],
    writer: ProgressWriter,
    cancel: threading.Event,
    adapter_dir: Path,
    eval_rows: list[dict] | None = None,
):
    """Train a LoRA on `rows` (its loss on `eval_rows` each epoch) and save it to `adapter_dir`. Returns (metrics,
    trainer) (the caller frees it)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from training.progress import ProgressCallback

    model, tokenizer = load_model_for_training(cfg, "causal")
    args = SFTConfig(
        **trainer_args_kwargs(cfg),
        max_length=cfg.max_length,
        completion_only_loss=True,
        packing=False,
        eval_strategy="epoch" if eval_rows else "no",
    )
    progress = ProgressCallback(writer, cancel, rename=SFT_RENAME)
    trainer = SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        peft_config=None if cfg.init_adapter else lora_config(cfg),
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)
    kept = kept_rows(trainer, len(rows), len(eval_rows or []), cfg.max_length, cfg.data)
    trainer.train()
    save_adapter(trainer.model, tokenizer, adapter_dir)
    last = progress.last
    metrics = {
        "steps": trainer.state.global_step,
        **kept,
        "loss": last.get("loss"),
        "token_accuracy": last.get("token_accuracy"),
        "train_loss": progress.summary.get("train_loss"),
        "train_runtime": progress.summary.get("train_runtime"),
        **eval_metrics(progress),
    }
    return metrics, trainer


def train(cfg: PrefSFTConfig, writer: ProgressWriter, cancel: threading.Event) -> dict:
    rows = load_rows(cfg.data)
    check_completions(rows, cfg.data)
    train_rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    adapter_dir = Path(cfg.out) / "adapter"
    fitted, trainer = fit(cfg, train_rows, writer, cancel, adapter_dir, eval_rows)
    del trainer
    metrics = {"method": "sft", **fitted, "base_version": cfg.base_version, "continued_from": cfg.init_adapter}
    if not cancel.is_set() and cfg.before_after_prompts > 0 and is_main_process():
        panel = run_before_after(cfg, adapter_dir, rows, cancel)
        if panel is not None:  # None: cancelled while sampling
            metrics["before_after"] = panel
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_method(PrefSFTConfig, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())

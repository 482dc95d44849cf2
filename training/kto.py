"""LoRA KTO: `python -m training kto --data SNAPSHOT --out RUN_DIR [--config run.yaml] [--flags]`.

KTO (TRL `KTOTrainer`) learns from unpaired labels: each row is one answer marked desirable or not. It uses what
DPO cannot: a "both bad" judgement gives two undesirable answers, and a winner / loser still gives one of each
(storage/exporters.py `kto` export). The reference model is handled as in DPO (training/dpo.py): a fresh LoRA is
compared with the base (adapter disabled); continuing from an adapter version compares with a frozen copy of it.
Reads only the snapshot file; never opens the DuckDB database.
"""

from __future__ import annotations

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

KTO_RENAME = {
    "rewards/margins": "reward_margin",
    "rewards/chosen": "reward_desirable",
    "rewards/rejected": "reward_undesirable",
    "kl": "kl",
}


@dataclass
class PrefKTOConfig(CommonConfig):
    """LoRA KTO on unpaired labels (prompt, completion, label: desirable or not).

    Defaults follow the DPO ones (training/dpo.py) where they mean the same: learning_rate 2e-4 (TRL 1e-6 is for
    full fine-tuning), epochs 2, beta 0.1, LoRA r 8 / alpha 16 / dropout 0, batch_size 4 (TRL's KL term pairs each
    answer with another prompt of its batch, so a batch needs at least 2 rows), max_length 256.
    balance_weights: KTO wants desirable_weight × n_desirable / (undesirable_weight × n_undesirable) in [1, 4/3]
    (KTO paper, Eq. 8); "both bad" labels make undesirable rows the majority, so the majority side is down-weighted
    to make the ratio 1.
    """

    method_name: ClassVar[str] = "kto"
    learning_rate: float = field(default=2e-4, metadata={"help": "peak AdamW learning rate (TRL: 1e-6)"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the rows when max_steps is -1 (TRL: 3)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (0 keeps KTO exact)"})
    beta: float = field(default=0.1, metadata={"help": "KTO beta: higher keeps the policy closer to the reference"})
    desirable_weight: float = field(default=1.0, metadata={"help": "loss weight of desirable answers"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "loss weight of undesirable answers"})
    balance_weights: bool = field(
        default=True, metadata={"help": "down-weight the more frequent label so both sides weigh the same in total"}
    )

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise ConfigError(f"beta: must be above 0 (got {self.beta})")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size: KTO's KL estimate needs at least 2 rows per batch (got {self.batch_size})")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be above 0 (got {getattr(self, name)})")


def check_labels(rows: list[dict], path: str) -> None:
    """Every row needs a prompt, a non-empty completion and a true/false label, prompt and completion in one style
    (text or chat) in every row."""
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("prompt", "completion") if not row.get(key)]
        if missing or not isinstance(row.get("label"), bool):
            what = ", ".join(missing + ([] if isinstance(row.get("label"), bool) else ["label (true or false)"]))
            raise DataError(f"{path}, row {number}: missing or empty {what} (need prompt, completion, label)")
    check_styles(rows, ("prompt", "completion"), path)


def label_weights(cfg: PrefKTOConfig, desirable: int, undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): as configured, or with the majority side scaled to balance."""
    weight_d, weight_u = cfg.desirable_weight, cfg.undesirable_weight
    if cfg.balance_weights and desirable and undesirable:
        if undesirable > desirable:
            weight_u *= desirable / undesirable
        else:
            weight_d *= undesirable / desirable
    return round(weight_d, 4), round(weight_u, 4)


def train(cfg: PrefKTOConfig, writer: ProgressWriter, cancel: threading.Event) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import KTOConfig, KTOTrainer

    from training.progress import ProgressCallback

    rows = load_rows(cfg.data)
    check_labels(rows, cfg.data)  # every row, held out or not, before anything is loaded
    train_rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    desirable = sum(1 for row in train_rows if row["label"])  # the weights balance what it trains on
    undesirable = len(train_rows) - desirable
    weight_d, weight_u = label_weights(cfg, desirable, undesirable)
    model, tokenizer = load_model_for_training(cfg, "causal")
    args = KTOConfig(
        **trainer_args_kwargs(cfg),
        beta=cfg.beta,
        desirable_weight=weight_d,
        undesirable_weight=weight_u,
        max_length=cfg.max_length,
        disable_dropout=cfg.lora_dropout == 0,
        eval_strategy="epoch" if eval_rows else "no",
    )
    progress = ProgressCallback(writer, cancel, rename=KTO_RENAME)
    trainer = KTOTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        peft_config=None if cfg.init_adapter else lora_config(cfg),
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)
    kept = kept_rows(trainer, len(train_rows), len(eval_rows), cfg.max_length, cfg.data)
    trainer.train()
    adapter_dir = save_adapter(trainer.model, tokenizer, Path(cfg.out) / "adapter")
    last = progress.last
    metrics = {
        "method": "kto",
        "steps": trainer.state.global_step,
        **kept,
        "desirable": desirable,
        "undesirable": undesirable,
        "desirable_weight": weight_d,
        "undesirable_weight": weight_u,
        "loss": last.get("loss"),
        "reward_margin": last.get("reward_margin"),
        "kl": last.get("kl"),
        "train_loss": progress.summary.get("train_loss"),
        "train_runtime": progress.summary.get("train_runtime"),
        "base_version": cfg.base_version,
        "continued_from": cfg.init_adapter,
        "reference": "parent adapter (frozen copy)" if cfg.init_adapter else "base model (adapter disabled)",
        **eval_metrics(progress),
    }
    if not cancel.is_set() and cfg.before_after_prompts > 0 and is_main_process():
        del trainer, model
        panel = run_before_after(cfg, adapter_dir, rows, cancel)
        if panel is not None:  # None: cancelled while sampling
            metrics["before_after"] = panel
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_method(PrefKTOConfig, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())

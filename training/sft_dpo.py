"""SFT, then DPO, in one run: `python -m training sft_dpo --data PAIRS --out RUN_DIR [--config run.yaml] [--flags]`.

Stage 1 fine-tunes a LoRA on the chosen answers of the pairs (each distinct prompt + chosen once: the winners and
the edited answers), saved to RUN_DIR/sft_adapter. Stage 2 is DPO (training/dpo.py) continuing from that adapter,
so DPO's reference is the SFT model: the preference step starts from a model that already writes the chosen style.
One version is registered (RUN_DIR/adapter); its parent, and the before/after panel's, is the version the run
started from. progress.jsonl holds both stages, each from its own `start` line. Reads only the snapshot file.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from training.before_after import run_before_after
from training.dpo import PrefDPOConfig, check_pairs
from training.dpo import train as train_dpo
from training.files import write_jsonl
from training.progress import ProgressWriter, is_main_process
from training.sft import PrefSFTConfig, fit


@dataclass
class PrefSFTDPOConfig(PrefDPOConfig):
    """SFT on the chosen answers, then DPO on the pairs from there (the DPO fields are the second stage's)."""

    method_name: ClassVar[str] = "sft_dpo"
    sft_epochs: float = field(default=1.0, metadata={"help": "stage 1: passes over the chosen answers"})
    sft_learning_rate: float = field(default=2e-4, metadata={"help": "stage 1: peak AdamW learning rate"})

    def validate(self) -> None:
        super().validate()
        from training.configparse import ConfigError

        if not self.sft_epochs > 0 or not self.sft_learning_rate > 0:
            raise ConfigError("sft_epochs and sft_learning_rate: must be above 0")


def chosen_rows(pairs: list[dict]) -> list[dict]:
    """(prompt, chosen) of every pair, each distinct one once, in order: the SFT stage's rows."""
    seen, rows = set(), []
    for pair in pairs:
        key = json.dumps([pair["prompt"], pair["chosen"]], sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            rows.append({"prompt": pair["prompt"], "completion": pair["chosen"]})
    return rows


def train(cfg: PrefSFTDPOConfig, writer: ProgressWriter, cancel: threading.Event) -> dict:
    from training.data import load_rows, split_rows

    pairs = load_rows(cfg.data)
    check_pairs(pairs, cfg.data)
    out = Path(cfg.out)
    trained, held = split_rows(
        pairs, cfg.eval_fraction, cfg.seed
    )  # the DPO stage holds out the same pairs (same seed)
    sft_rows = chosen_rows(trained)  # so stage 1 never sees a held-out pair's chosen answer
    write_jsonl(out / "sft_data.jsonl", sft_rows)
    common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PrefSFTConfig) if f.name != "method_name"}
    sft_cfg = PrefSFTConfig(
        **{
            **common,
            "data": str(out / "sft_data.jsonl"),
            "epochs": cfg.sft_epochs,
            "learning_rate": cfg.sft_learning_rate,
            "max_steps": cfg.max_steps,  # a cap the form sets holds for each stage (-1: by epochs)
        }
    )
    sft_metrics, trainer = fit(sft_cfg, sft_rows, writer, cancel, out / "sft_adapter", chosen_rows(held))
    del trainer
    if cancel.is_set():  # stopped during stage 1: what is done is the SFT adapter
        (out / "sft_adapter").rename(out / "adapter")
        return {"method": "sft_dpo", "sft": sft_metrics, "stopped_in": "sft"}
    dpo_cfg = dataclasses.replace(cfg, init_adapter=str(out / "sft_adapter"), before_after_prompts=0)
    metrics = train_dpo(dpo_cfg, writer, cancel)
    metrics.update(
        method="sft_dpo",
        sft=sft_metrics,
        continued_from=cfg.init_adapter,
        reference="the SFT stage's model (frozen copy)",
    )
    if not cancel.is_set() and cfg.before_after_prompts > 0 and is_main_process():
        panel = run_before_after(cfg, out / "adapter", pairs, cancel)  # against the run's parent
        if panel is not None:  # None: cancelled while sampling
            metrics["before_after"] = panel
    return metrics


def main(argv: list[str] | None = None) -> int:
    from training.common import run_method

    return run_method(PrefSFTDPOConfig, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""A run's settings checked in the app before it is queued, by the same dataclass and `validate()` its child runs.

Light imports only (the app imports this through training.runner; the config modules load torch only when they
train). Without it, a value the Train tab let through (max length 8, KTO with batch size 1, PPO with no episodes in
a reward → PPO chain) failed only in the child, after the snapshot, the queue, and for a chain the reward model.
"""

from __future__ import annotations

import importlib
import math
import tempfile
from pathlib import Path

from training.configparse import ConfigError, build_config

CONFIGS = {  # method: (module, its config dataclass)
    "dpo": ("training.dpo", "PrefDPOConfig"),
    "kto": ("training.kto", "PrefKTOConfig"),
    "sft": ("training.sft", "PrefSFTConfig"),
    "sft_dpo": ("training.sft_dpo", "PrefSFTDPOConfig"),
    "reward": ("training.reward", "RewardModelConfig"),
    "ppo": ("training.ppo", "PPORunConfig"),
}
POSITIVE = ("learning_rate", "beta", "max_steps", "epochs", "batch_size", "lora_r", "lora_alpha", "max_length")
MAX_LEARNING_RATE = 0.1  # far above any LoRA rate that trains (1e-5 … 1e-3): a typo, not a choice


def check_settings(method: str, settings: dict, run_fields: dict, reward_model_later: bool = False) -> None:
    """ConfigError unless the child would accept `settings` with the fields the runner adds (`run_fields`: base
    model, cache, parent adapter). The data file is a stand-in (its rows are checked when snapshotted);
    `reward_model_later`: a chain's PPO half, whose reward model does not exist yet."""
    _plain_checks(settings)
    module, name = CONFIGS[method]
    cls = getattr(importlib.import_module(module), name)
    with tempfile.TemporaryDirectory(prefix="prefloop-check-") as folder:
        stand_in = Path(folder) / "data.jsonl"
        stand_in.write_text("", encoding="utf-8")
        values = {**settings, **run_fields, "data": str(stand_in), "out": folder}
        if method == "ppo":
            values["prompts"] = str(stand_in)
        cfg = build_config(cls, values)
        if reward_model_later:
            from training.common import CommonConfig

            CommonConfig.validate(cfg)
            cfg.validate_rollout()
        else:
            cfg.validate()


def _plain_checks(settings: dict) -> None:
    """The Train tab's usual mistakes, in its words (the dataclass would refuse them too, in its own)."""
    for name in POSITIVE:
        value = settings.get(name)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name.replace('_', ' ')} must be a number above 0 (got {value!r})")
    if settings.get("learning_rate") and settings["learning_rate"] > MAX_LEARNING_RATE:
        raise ConfigError(f"learning rate {settings['learning_rate']} is far too high for LoRA (try 1e-5 … 1e-3)")

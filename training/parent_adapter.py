"""The LoRA shape of a continued run: with `init_adapter`, training goes on in that adapter, so its rank, alpha,
dropout and target modules are the parent's whatever the config asks; the config records those instead.

A value set by a command-line flag that differs from the parent's is refused (the person asked for something that
cannot happen); one from `--config` or a default (the runner writes the Train tab's LoRA settings into run.yaml,
also when it continues from the serving version) is replaced by the parent's, with a note in the log.
Standard library only: it reads the parent's adapter_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.configparse import ConfigError

LORA_FIELDS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}


def parent_lora(adapter: str | Path) -> dict:
    """{lora_r, lora_alpha, lora_dropout, lora_target_modules} of a saved PEFT LoRA adapter folder."""
    path = Path(adapter) / "adapter_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"init_adapter: {path} is unreadable ({exc})") from None
    values = {name: saved.get(key) for name, key in LORA_FIELDS.items()}
    for name, kind in (("lora_r", int), ("lora_alpha", int), ("lora_dropout", float)):
        values[name] = None if values[name] is None else kind(values[name])
    targets = saved.get("target_modules")
    if isinstance(targets, list):  # peft saves "all-linear" expanded to full module names: keep the leaf names
        targets = ",".join(sorted({str(t).rsplit(".", 1)[-1] for t in targets}))
    values["lora_target_modules"] = targets
    return {name: value for name, value in values.items() if value is not None}


def _same(name: str, mine, theirs) -> bool:
    if name == "lora_target_modules":
        return {t.strip().rsplit(".", 1)[-1] for t in str(mine).split(",")} == set(str(theirs).split(","))
    return float(mine) == float(theirs)


def adopt_parent_lora(cfg, flags: set[str]) -> list[str]:
    """Set cfg's LoRA fields to those of `cfg.init_adapter` (when the method continues from it); the notes to log.
    ConfigError when a flag in `flags` asked for another value."""
    if not cfg.init_adapter or not getattr(cfg, "continues_adapter", True):
        return []
    parent = parent_lora(cfg.init_adapter)
    notes, refused = [], []
    for name, value in parent.items():
        mine = getattr(cfg, name)
        if _same(name, mine, value):
            setattr(cfg, name, value)
            continue
        flag = "--" + name.replace("_", "-")
        if name in flags:
            refused.append(f"{flag} {mine} differs from the parent adapter's {value}")
        else:
            notes.append(f"{name} {mine} is not used: training continues in {cfg.init_adapter}, with {name} {value}")
        setattr(cfg, name, value)
    if refused:
        raise ConfigError(
            f"{'; '.join(refused)}: continuing from --init-adapter {cfg.init_adapter} keeps its LoRA shape; "
            "drop the flag, or train a fresh LoRA without --init-adapter"
        )
    return notes

"""The Train tab's form → run settings: empty keeps the method's default, numbers are checked and bounded."""

from __future__ import annotations

from labeling.services import UserError

METHODS = {
    "DPO": "dpo",
    "Auto": "auto",  # DPO, KTO or SFT → DPO from the mix of judgements (training/datamix.py); the run says why
    "KTO": "kto",
    "SFT": "sft",
    "SFT → DPO": "sft_dpo",
    "Reward model": "reward",
    "PPO": "ppo",
    "Reward model → PPO": "chain",
}
FIELDS = {  # name: (label, upper bound; a browser may not ask for more: it would hold the machine for hours)
    "max_steps": ("Max steps (empty: epochs decide)", 10_000),
    "learning_rate": ("Learning rate (empty: default)", 1.0),
    "beta": ("DPO beta (empty: default)", 100.0),
    "epochs": ("Epochs", 50),
    "batch_size": ("Batch size", 256),
    "max_length": ("Max length (tokens)", 8_192),
    "seed": ("Seed", 2**31 - 1),
    "lora_r": ("LoRA r", 256),
    "lora_alpha": ("LoRA alpha", 1_024),
    "lora_dropout": ("LoRA dropout", 0.9),
    "total_episodes": ("PPO episodes", 100_000),
    "response_length": ("PPO response length", 2_048),
    "kl_coef": ("PPO KL coefficient", 100.0),
}
INTEGER_FIELDS = {
    "max_steps",
    "batch_size",
    "max_length",
    "seed",
    "lora_r",
    "lora_alpha",
    "total_episodes",
    "response_length",
}
REWARD_KEYS = {
    "max_steps",
    "learning_rate",
    "epochs",
    "batch_size",
    "max_length",
    "seed",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
}
PPO_ONLY = {"total_episodes", "response_length", "kl_coef", "reward_model"}
PPO_UNUSED = {"beta", "epochs"}  # PPO's length is total_episodes (and max_steps); it would refuse epochs


def parse_settings(values: dict) -> dict:
    """Form values → run settings; empty fields are left out, anything not a number in range is refused by name."""
    settings = {}
    for name, value in values.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if name == "reward_model":  # a reward version's folder: the runner finds its version and checks its base
            settings[name] = str(value)
            continue
        settings[name] = _number(name, str(value).strip())
    return settings


def _number(name: str, text: str) -> int | float:
    label = name.replace("_", " ")
    try:
        number = float(text)
    except ValueError:
        raise UserError(f"{label}: {text!r} is not a number") from None
    if name in INTEGER_FIELDS:
        if not number.is_integer():
            raise UserError(f"{label}: {text!r} must be a whole number")
        number = int(number)
    upper = FIELDS[name][1]
    if not 0 <= number <= upper:
        raise UserError(f"{label}: {text} is out of range (0 to {upper:g})")
    return number


def submit(runner, kind: str, settings: dict, parent_id: int) -> int:
    """Queue a run (or the reward → PPO chain) with the settings each method takes."""
    if kind == "chain":
        reward_settings = {k: v for k, v in settings.items() if k in REWARD_KEYS}
        not_ppo = {"reward_model"} | PPO_UNUSED  # the chain's own reward model is the one
        ppo_settings = {k: v for k, v in settings.items() if k not in not_ppo}
        return runner.submit_chain(reward_settings, ppo_settings, parent_version=parent_id)
    if kind in ("dpo", "auto", "kto", "sft_dpo"):
        settings = {k: v for k, v in settings.items() if k not in PPO_ONLY}
    elif kind == "sft":
        settings = {k: v for k, v in settings.items() if k not in PPO_ONLY and k != "beta"}
    elif kind == "reward":
        settings = {k: v for k, v in settings.items() if k in REWARD_KEYS}
    else:  # ppo
        settings = {k: v for k, v in settings.items() if k not in PPO_UNUSED}
    return runner.submit(kind, settings, parent_version=parent_id)

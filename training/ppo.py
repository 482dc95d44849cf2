"""LoRA PPO: `python -m training ppo --data PROMPTS --reward-model DIR --out RUN_DIR [--config run.yaml] [--flags]`.

`trl.experimental.ppo.PPOTrainer` (trl 1.12.0, the last release with PPO):
- policy: a LoRA on the base model; with `init_adapter` (the serving version's adapter) training continues from it;
- reward model: a reward run's reward_model/ folder, frozen; value model: a second copy of it, trained (TRL trains
  the whole value model, the policy only through its LoRA);
- reference for the KL penalty, without a second copy of the weights: a fresh LoRA → the base (adapter disabled);
  a continued adapter → by default the parent version (a frozen copy of `init_adapter` named "ref", as DPO does),
  so PPO stays close to the version people judged; `--reference base` uses the base (adapter disabled) instead.
- prompts: `--prompts FILE` or else the `--data` snapshot (rows with a "prompt"; the runner writes those with
  comparisons first). The first distinct prompts, one per episode (`total_episodes`, fewer with `max_steps`), are
  used, repeated when fewer than a batch; the `prompts` metric counts them.

Answers stop at the end-of-turn token and the reward head reads that token (see training.reward): generation and
reward-model training see the same sequence layout. PPOTrainer's loop ignores `control.should_training_stop`, so a
SIGTERM is honoured by raising from the step-end callback: the update in flight finishes, the adapter is saved,
and the run ends "cancelled". Reads only the snapshot files; never opens the DuckDB database.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from training.before_after import run_before_after
from training.common import CommonConfig, run_method
from training.configparse import ConfigError
from training.data import DataError, load_rows
from training.modeling import load_model_for_training, lora_config, save_adapter, trainer_args_kwargs
from training.progress import ProgressLogic, ProgressWriter, trainer_callback
from training.reward import as_prompt, check_reward_model, use_distinct_pad_token

REFERENCES = ("parent", "base")
PPO_RENAME = {  # TRL's PPO log keys → progress line fields
    "objective/rlhf_reward": "reward",
    "objective/kl": "kl",
    "loss/policy_avg": "policy_loss",
    "loss/value_avg": "value_loss",
    "policy/clipfrac_avg": "clip_fraction",
    "policy/entropy_avg": "entropy",
    "objective/scores": "score",
    "episode": "episode",
    "val/num_eos_tokens": "eos_count",
}
SUMMARY_KEYS = ("reward", "kl", "score", "policy_loss", "value_loss", "clip_fraction", "entropy")


@dataclass
class PPORunConfig(CommonConfig):
    """LoRA PPO against a trained reward model, on the prompts of the snapshot.

    Defaults run on CPU in a few minutes with the bundled 135M model (≈ 10-15 s per update of 4 episodes ×
    32 tokens): 32 episodes = 8 updates. learning_rate 1e-4 (LoRA; TRL's 3e-6 is for full fine-tuning), kl_coef
    0.05, num_ppo_epochs 4 and temperature 0.7 as TRL. `epochs` and `eval_fraction` are not used (total_episodes and
    max_steps decide the length; nothing is held out): a value other than their default is refused, not ignored.
    """

    method_name: ClassVar[str] = "ppo"
    learning_rate: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate (LoRA + value model)"})
    batch_size: int = field(default=4, metadata={"help": "episodes (prompts answered) per PPO update"})
    max_steps: int = field(default=-1, metadata={"help": "cap on PPO updates; -1 = total_episodes / batch_size"})
    max_length: int = field(default=256, metadata={"help": "max prompt tokens (a longer prompt loses its start)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (PPO disables dropout)"})
    epochs: float = field(
        default=1.0, metadata={"help": "not used by PPO (total_episodes and max_steps decide the length); only 1"}
    )
    eval_fraction: float = field(
        default=0.0, metadata={"help": "not used by PPO (it holds nothing out: the reward model judges); only 0"}
    )
    reward_model: str = field(default="", metadata={"help": "reward model folder (a reward run's reward_model/)"})
    reward_model_version: int | None = field(default=None, metadata={"help": "its model version id (for the record)"})
    prompts: str | None = field(default=None, metadata={"help": "prompts file (rows with 'prompt'); none = --data"})
    total_episodes: int = field(default=32, metadata={"help": "answers generated and scored over the whole run"})
    response_length: int = field(default=32, metadata={"help": "max new tokens per answer"})
    kl_coef: float = field(default=0.05, metadata={"help": "weight of the KL penalty to the reference"})
    num_ppo_epochs: int = field(default=4, metadata={"help": "optimisation passes over each batch of episodes"})
    num_mini_batches: int = field(default=1, metadata={"help": "mini-batches per pass (must divide the batch)"})
    missing_eos_penalty: float = field(
        default=0.0, metadata={"help": "subtracted from the score of an answer cut off at response_length (0 = off)"}
    )
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the episodes"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    cliprange: float = field(default=0.2, metadata={"help": "PPO clip range of the policy ratio"})
    reference: str = field(
        default="parent", metadata={"help": "KL reference with init_adapter: 'parent' (that adapter) or 'base'"}
    )

    def validate(self) -> None:
        super().validate()
        check_reward_model(self.reward_model)
        _check_vocab(self)
        self.validate_rollout()

    def validate_rollout(self) -> None:
        """Every check but the reward model's (a chain's PPO settings are checked before its reward model exists)."""
        if self.prompts:
            path = Path(self.prompts)
            if not path.is_file():
                raise ConfigError(f"prompts: file {self.prompts} does not exist")
            if path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
                raise ConfigError(f"prompts: {self.prompts}: use .jsonl, .json or .parquet")
        for name, default in (("epochs", 1), ("eval_fraction", 0)):
            if getattr(self, name) != default:
                raise ConfigError(
                    f"{name}: PPO does not use it (got {getattr(self, name)}): total_episodes and max_steps decide "
                    "how long it trains, and it holds nothing out"
                )
        for name in ("total_episodes", "response_length", "num_ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be ≥ 1 (got {getattr(self, name)})")
        rollout = self.batch_size * self.gradient_accumulation_steps
        if rollout % self.num_mini_batches:
            raise ConfigError(f"num_mini_batches: {self.num_mini_batches} does not divide the batch of {rollout}")
        for name in ("kl_coef", "missing_eos_penalty", "vf_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be ≥ 0 (got {getattr(self, name)})")
        if not self.temperature > 0 or not self.cliprange > 0:
            raise ConfigError("temperature and cliprange: must be above 0")
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference: {self.reference!r} is not one of {', '.join(REFERENCES)}")


def _check_vocab(cfg: PPORunConfig) -> None:
    """The reward model must read the policy's token ids: same vocabulary size as the base (when it is on disk)."""
    from models.loading import BUNDLED, BUNDLED_FOLDER

    base = Path(cfg.model_cache) / BUNDLED_FOLDER if cfg.base_model == BUNDLED else Path(cfg.base_model)
    if not (base / "config.json").is_file():
        return  # a hub id or a not yet converted bundled model: checked when loaded
    vocab = json.loads((base / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    reward_vocab = json.loads((Path(cfg.reward_model) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    if vocab and reward_vocab and vocab != reward_vocab:
        raise ConfigError(
            f"reward_model: {cfg.reward_model} has a vocabulary of {reward_vocab} tokens but the base model "
            f"{cfg.base_model} has {vocab}: train the reward model on the same base model"
        )


# ---- prompts -------------------------------------------------------------------------------------------
def load_prompts(path: str, limit: int) -> list[list[dict]]:
    """The first `limit` distinct prompts (as chats) of a file of rows with a "prompt"."""
    prompts, seen = [], set()
    for number, row in enumerate(load_rows(path), start=1):
        if row.get("prompt") in (None, "", []):
            raise DataError(f"{path}, row {number}: missing prompt (a prompts file has a 'prompt' in every row)")
        chat = as_prompt(row["prompt"], f"{path}, row {number}")
        key = json.dumps(chat, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            prompts.append(chat)
        if len(prompts) == limit:
            break
    return prompts


def prompt_dataset(tokenizer, prompts: list[list[dict]], max_length: int, min_rows: int):
    """Tokenized prompts (+ generation prompt), left-truncated; repeated until there is at least one batch."""
    from datasets import Dataset

    ids = [
        list(
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        )[-max_length:]
        for p in prompts
    ]
    while len(ids) < min_rows:  # PPOTrainer drops an incomplete batch; a lone prompt is then sampled repeatedly
        ids += ids[: min_rows - len(ids)]
    return Dataset.from_dict({"input_ids": ids})


# ---- callbacks -----------------------------------------------------------------------------------------
class PPOCancelled(Exception):
    """Raised between PPO updates after SIGTERM: PPOTrainer.train() has no other way out of its loop."""


class PPOProgressLogic(ProgressLogic):
    """Progress lines for PPO: TRL's metric names renamed, plus loss (policy + vf_coef × value) and learning_rate.

    The Trainer gets `trainer_callback(PPOProgressLogic)` (built in `train`, when transformers is loaded anyway).
    """

    def __init__(self, writer: ProgressWriter, cancel: threading.Event, vf_coef: float):
        super().__init__(writer, cancel, rename=PPO_RENAME)
        self.vf_coef = vf_coef
        self.first: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss/policy_avg" in logs and "loss/value_avg" in logs:
            logs["loss"] = logs["loss/policy_avg"] + self.vf_coef * logs["loss/value_avg"]
        if "lr" in logs:
            logs.setdefault("learning_rate", logs["lr"])
        control = super().on_log(args, state, control, logs=logs, **kwargs)
        self.first = self.first or dict(self.last)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.cancel.is_set():
            raise PPOCancelled
        return super().on_step_end(args, state, control, **kwargs)


# ---- training ------------------------------------------------------------------------------------------
def load_models(cfg: PPORunConfig):
    """(policy PeftModel, tokenizer, reward model, value model, reference description)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from models.device import training_dtype_name

    policy, tokenizer = load_model_for_training(cfg, "causal")
    use_distinct_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # PPOTrainer appends the answer right after the (left-padded) prompt
    if cfg.init_adapter and cfg.reference == "parent":
        policy.load_adapter(cfg.init_adapter, adapter_name="ref", is_trainable=False)
        policy.set_adapter("default")
        reference = f"parent adapter {cfg.init_adapter} (frozen copy)"
    elif cfg.init_adapter:
        reference = "base model (adapter disabled)"
    else:
        policy = get_peft_model(policy, lora_config(cfg, "CAUSAL_LM"))
        reference = "base model (adapter disabled)"
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    dtype = getattr(torch, training_dtype_name())
    reward_model = AutoModelForSequenceClassification.from_pretrained(cfg.reward_model, num_labels=1, dtype=dtype)
    reward_model.requires_grad_(False)
    value_model = AutoModelForSequenceClassification.from_pretrained(cfg.reward_model, num_labels=1, dtype=dtype)
    for model in (reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.config.vocab_size != policy.config.vocab_size:
            raise ConfigError(
                f"reward_model: vocabulary {model.config.vocab_size} ≠ the policy's {policy.config.vocab_size}: "
                "train the reward model on the same base model"
            )
    return policy, tokenizer, reward_model, value_model, reference


def episode_count(cfg: PPORunConfig) -> int:
    """Episodes the run generates: total_episodes, fewer when max_steps caps the updates."""
    if cfg.max_steps > 0:
        return min(cfg.total_episodes, cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps)
    return cfg.total_episodes


def ppo_args(cfg: PPORunConfig, has_ref_adapter: bool):
    from trl.experimental.ppo import PPOConfig

    return PPOConfig(
        **trainer_args_kwargs(cfg),
        total_episodes=episode_count(cfg),
        response_length=cfg.response_length,
        kl_coef=cfg.kl_coef,
        num_ppo_epochs=cfg.num_ppo_epochs,
        num_mini_batches=cfg.num_mini_batches,
        missing_eos_penalty=cfg.missing_eos_penalty or None,
        temperature=cfg.temperature,
        vf_coef=cfg.vf_coef,
        cliprange=cfg.cliprange,
        stop_token="eos",
        num_sample_generations=0,
        ref_adapter_name="ref" if has_ref_adapter else None,
        model_adapter_name="default" if has_ref_adapter else None,
    )


def train(cfg: PPORunConfig, writer: ProgressWriter, cancel: threading.Event) -> dict:
    from transformers import PrinterCallback
    from trl.experimental.ppo import PPOTrainer

    prompts = load_prompts(cfg.prompts or cfg.data, episode_count(cfg))  # the prompts it answers: one per episode
    policy, tokenizer, reward_model, value_model, reference = load_models(cfg)
    args = ppo_args(cfg, has_ref_adapter="ref" in policy.peft_config)
    dataset = prompt_dataset(tokenizer, prompts, cfg.max_length, cfg.batch_size * cfg.gradient_accumulation_steps)
    progress = trainer_callback(PPOProgressLogic)(writer, cancel, cfg.vf_coef)
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # the writer echoes every progress line already
    started = time.monotonic()
    try:
        if not cancel.is_set():
            trainer.train()
    except PPOCancelled:
        pass  # the update in flight finished; keep what is done
    seconds = time.monotonic() - started
    adapter_dir = save_adapter(policy, tokenizer, Path(cfg.out) / "adapter")
    metrics = summarize(cfg, trainer.state, progress, seconds, len(prompts), reference)
    del trainer, policy, reward_model, value_model  # free the training models before sampling again
    gc.collect()
    if not cancel.is_set() and cfg.before_after_prompts > 0:
        panel = run_before_after(cfg, adapter_dir, [{"prompt": p} for p in prompts], cancel)
        if panel is not None:  # None: cancelled while sampling
            metrics["before_after"] = panel
    return metrics


def summarize(cfg: PPORunConfig, state, progress: PPOProgressLogic, seconds: float, n_prompts: int, reference: str):
    updates = state.global_step
    metrics = {
        "method": "ppo",
        "updates": updates,
        "episodes": getattr(state, "episode", 0),
        "prompts": n_prompts,
        "seconds": round(seconds, 1),
        "seconds_per_update": round(seconds / updates, 2) if updates else None,
        "episodes_per_second": round(getattr(state, "episode", 0) / seconds, 3) if seconds and updates else None,
        "reward_model": cfg.reward_model,
        "reward_model_version": cfg.reward_model_version,
        "base_version": cfg.base_version,
        "continued_from": cfg.init_adapter,
        "reference": reference,
    }
    metrics.update({key: progress.last.get(key) for key in SUMMARY_KEYS})
    metrics.update({f"first_{key}": progress.first.get(key) for key in ("reward", "score")})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_method(PPORunConfig, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Reward model: `python -m training reward --data REWARD_EXPORT --out RUN_DIR [--config run.yaml] [--flags]`.

`trl.RewardTrainer` on (prompt, chosen, rejected) rows: the base model with a one-output sequence-classification
head, LoRA (task SEQ_CLS; the head itself is trained in full through `modules_to_save=["score"]`), a held-out split
whose pairwise accuracy goes into the progress stream (eval events) and the final metrics (`eval_accuracy`).
The result is merged (`merge_and_unload()`) and saved as a plain AutoModelForSequenceClassification folder plus
tokenizer in RUN_DIR/reward_model, which PPO loads as reward and value model and `python -m training score` uses.

Where the score is read: every answer is tokenized as prompt + answer through the chat template and cut right after
the answer's end-of-turn token, and padding uses a token that is not the end-of-turn token. The head therefore
reads the end-of-turn token: the same position PPO reads for a generated answer (generation stops there).
`init_adapter` (the serving policy's adapter) is not applied: a reward model judges answers, it starts from the base.
Reads only the snapshot file; never opens the DuckDB database.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from training.common import CommonConfig, run_method
from training.configparse import ConfigError
from training.data import DataError, kept_rows, load_rows, split_rows
from training.modeling import load_model_for_training, lora_config, trainer_args_kwargs
from training.progress import ProgressLogic, ProgressWriter

EVALS_PER_RUN = 4  # held-out evaluations spread over a run (each costs one pass over the small eval split)
REWARD_RENAME = {"accuracy": "accuracy", "margin": "margin", "mean_reward": "mean_reward"}
EVAL_METRICS = ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward")
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>")  # tried after the tokenizer's unk token
SCORING_LINE_SECONDS = 5.0  # "scoring" progress lines while the stored answers are scored (not one per batch)


@dataclass
class RewardModelConfig(CommonConfig):
    """Reward model (LoRA on a sequence-classification head) on preference pairs (prompt, chosen, rejected).

    Defaults (measured on the bundled 135M model, 40 toy pairs: 8 steps ≈ 20 s, held-out accuracy 1.0):
    learning_rate 1e-4 (TRL's default for RewardTrainer), 1 epoch, batch 4, 10 % held out, LoRA dropout 0,
    center_rewards_coefficient 0.01 (TRL's recommended value: keeps scores near 0, which suits PPO's KL scale).
    """

    method_name: ClassVar[str] = "reward"
    continues_adapter: ClassVar[bool] = False  # a reward model starts from the base: init_adapter is not applied
    learning_rate: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the pairs when max_steps is -1"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    max_length: int = field(
        default=256, metadata={"help": "max tokens of prompt + answer (a longer one loses the prompt's start)"}
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={
            "help": "share of pairs held out for accuracy, whole prompts at a time: as near it as whole prompts "
            "allow (at most twice it; the log says when none could be); nothing under 4 pairs"
        },
    )
    center_rewards_coefficient: float = field(
        default=0.01, metadata={"help": "pulls the mean score toward 0 (0 = off)"}
    )
    score_data: str | None = field(
        default=None,
        metadata={
            "help": "after training, score these (prompt, answer) rows into RUN_DIR/scores.jsonl (the app "
            "passes every stored generation, so the Data tab shows reward scores)"
        },
    )

    def validate(self) -> None:
        super().validate()
        if self.center_rewards_coefficient < 0:
            raise ConfigError(f"center_rewards_coefficient: must be ≥ 0 (got {self.center_rewards_coefficient})")


# ---- tokenization shared with PPO and scoring ----------------------------------------------------------
def use_distinct_pad_token(tokenizer) -> None:
    """Pad with a token that never appears in a chat instead of the end-of-turn token.

    The bundled tokenizer pads with <|im_end|>, which also closes every chat message: PPO treats pad ids in a
    prompt as padding, and the reward head reads the last non-pad token, so both need pad ≠ end-of-turn.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    vocab = tokenizer.get_vocab()
    for token in (tokenizer.unk_token, *PAD_CANDIDATES):
        if token and token in vocab and vocab[token] != eos:
            tokenizer.pad_token = token
            return
    if tokenizer.pad_token is None:  # no spare token: the end-of-turn token it is (scores still work)
        tokenizer.pad_token = tokenizer.eos_token


def as_prompt(value: Any, where: str) -> list[dict]:
    """A prompt as a chat: plain text becomes one user message; a message list is checked."""
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", "user"), "content": str(m["content"])} for m in value]
    raise DataError(f"{where}: the prompt must be text or a list of chat messages (got {_short(value)})")


def as_answer(value: Any, where: str) -> list[dict]:
    """An answer as one assistant message: plain text, or a one-message list (TRL's conversational format)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    raise DataError(f"{where}: an answer must be text or a one-message list (got {_short(value)})")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def encode_answer(tokenizer, prompt: list[dict], answer: list[dict], max_length: int) -> list[int]:
    """Token ids of prompt + answer, ending at the answer's end-of-turn token, left-truncated to max_length.

    Left truncation keeps the end of the answer, where the score is read.
    """
    if tokenizer.chat_template:
        ids = list(tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"])
        eos = tokenizer.eos_token_id
        ends = [i for i, token in enumerate(ids) if token == eos]
        if ends:
            ids = ids[: ends[-1] + 1]  # drop what the template adds after the end-of-turn token ("\n")
    else:  # a base model without a chat template: plain text
        text = "\n".join(m["content"] for m in prompt) + "\n" + answer[0]["content"]
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return ids[-max_length:]


def pair_rows(rows: list[dict], path: str) -> list[tuple[list[dict], list[dict], list[dict]]]:
    """(prompt, chosen, rejected) chats of every row; DataError names the first bad row."""
    pairs = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}, row {number}"
        missing = [key for key in ("prompt", "chosen", "rejected") if row.get(key) in (None, "", [])]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)} (a reward row needs prompt, chosen, rejected)")
        pairs.append(
            (as_prompt(row["prompt"], where), as_answer(row["chosen"], where), as_answer(row["rejected"], where))
        )
    return pairs


def split_pairs(rows: list[dict], path: str, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) pairs of `rows`, split by prompt: the rows are split as dicts (split_rows groups them by their
    "prompt"), then converted. A prompt's rows share answers (winner over loser, the edit over each original), so
    one of them trained on and another held out made eval_accuracy too good; tuples have no "prompt" to group by."""
    pairs = pair_rows(rows, path)  # every row checked first: a DataError names its row number in the file
    keyed = [{"prompt": row["prompt"], "pair": pair} for row, pair in zip(rows, pairs, strict=True)]
    train_rows, eval_rows = split_rows(keyed, eval_fraction, seed)
    return [r["pair"] for r in train_rows], [r["pair"] for r in eval_rows]


def _tokenized(tokenizer, pairs, max_length: int):
    from datasets import Dataset

    def ids(prompt, answer):
        return encode_answer(tokenizer, prompt, answer, max_length)

    return Dataset.from_list([{"chosen_ids": ids(p, c), "rejected_ids": ids(p, r)} for p, c, r in pairs])


# ---- training ------------------------------------------------------------------------------------------
def train(cfg: RewardModelConfig, writer: ProgressWriter, cancel: threading.Event) -> dict:
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    from training.progress import ProgressCallback

    train_pairs, eval_pairs = split_pairs(load_rows(cfg.data), cfg.data, cfg.eval_fraction, cfg.seed)
    model, tokenizer = load_model_for_training(cfg, "seq_cls")
    use_distinct_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    total_steps = _total_steps(cfg, len(train_pairs))
    args = RewardConfig(
        **trainer_args_kwargs(cfg),
        max_length=cfg.max_length,
        disable_dropout=cfg.lora_dropout == 0,
        center_rewards_coefficient=cfg.center_rewards_coefficient or None,
        eval_strategy="steps" if eval_pairs else "no",
        eval_steps=max(1, math.ceil(total_steps / EVALS_PER_RUN)),
    )
    progress = ProgressCallback(writer, cancel, rename=REWARD_RENAME)
    trainer = RewardTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=_tokenized(tokenizer, train_pairs, cfg.max_length),
        eval_dataset=_tokenized(tokenizer, eval_pairs, cfg.max_length) if eval_pairs else None,
        peft_config=lora_config(cfg, "SEQ_CLS", modules_to_save=["score"]),
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # the writer echoes every progress line already
    kept = kept_rows(trainer, len(train_pairs), len(eval_pairs), cfg.max_length, cfg.data)  # none dropped: cut to fit
    trainer.train()
    if eval_pairs and progress.last_eval.get("step") != trainer.state.global_step:
        trainer.evaluate()  # the final metrics describe the finished model
    save_reward_model(trainer.model, tokenizer, Path(cfg.out) / "reward_model")
    metrics = {**summarize(cfg, trainer.state.global_step, progress, len(train_pairs), len(eval_pairs)), **kept}
    if cfg.score_data and not cancel.is_set():
        metrics.update(score_stored_generations(cfg, cancel, writer))
    return metrics


def score_stored_generations(cfg: RewardModelConfig, cancel=None, writer: ProgressWriter | None = None) -> dict:
    """Score the app's snapshot of stored generations with the new reward model; rows go to RUN_DIR/scores.jsonl.

    The reward model is saved by then, so neither a Cancel nor an error here undoes the run: a Cancel stops it at
    the next batch (none are written: scoring 100,000 answers takes hours on a CPU) and an error is logged; the
    metrics then carry a `note` and, for a Cancel, `cancelled_after_saving` (the run ends succeeded with the note,
    the reward model is registered, and a chained PPO run is not started: see training.registry.reward_outcome).
    A "scoring" line per batch goes to progress.jsonl (done, total), so the Train tab shows how far it is."""
    from training.score import ScoringCancelled, score_rows, write_rows

    last = [0.0]

    def on_batch(done: int, total: int) -> None:  # at most one line every SCORING_LINE_SECONDS, and the last
        if writer is not None and (done == total or time.monotonic() - last[0] >= SCORING_LINE_SECONDS):
            last[0] = time.monotonic()
            writer.write("scoring", done=done, total=total)

    try:
        rows = load_rows(cfg.score_data)  # never empty: load_rows refuses a file without rows
        scored = score_rows(
            rows, Path(cfg.out) / "reward_model", cfg.score_data, cfg.max_length, cancel=cancel, on_batch=on_batch
        )
        write_rows(
            [{"generation_id": r.get("generation_id"), "score": r["score"]} for r in scored],
            Path(cfg.out) / "scores.jsonl",
        )
    except ScoringCancelled as exc:
        note = f"the reward model is ready; scoring the stored answers was cancelled ({exc}): none were scored"
        return {"scored_generations": 0, "note": note, "cancelled_after_saving": True}
    except Exception as exc:  # the saved reward model is fine: say why the scores are missing, keep the run
        traceback.print_exc()
        return {"scored_generations": 0, "note": f"the reward model is ready, but scoring the stored answers "
                f"failed: {type(exc).__name__}: {exc}"}  # fmt: skip
    return {"scored_generations": len(scored)}


def _total_steps(cfg: CommonConfig, n_train: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * cfg.epochs))


def save_reward_model(peft_model, tokenizer, out_dir: Path) -> Path:
    """Merge the LoRA into the weights and save a plain one-output classifier + tokenizer (via a temp folder)."""
    merged = peft_model.merge_and_unload()
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.config.num_labels = 1
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def summarize(cfg: RewardModelConfig, steps: int, progress: ProgressLogic, n_train: int, n_eval: int) -> dict:
    last, last_eval = progress.last, progress.last_eval
    metrics = {
        "method": "reward",
        "steps": steps,
        "train_rows": n_train,
        "eval_rows": n_eval,
        "loss": last.get("loss"),
        "accuracy": last.get("accuracy"),
        "margin": last.get("margin"),
        "train_loss": progress.summary.get("train_loss"),
        "train_runtime": progress.summary.get("train_runtime"),
        "base_version": cfg.base_version,
        "reward_model": str(Path(cfg.out) / "reward_model"),
    }
    metrics.update({f"eval_{k}": last_eval[k] for k in EVAL_METRICS if k in last_eval})
    if not n_eval:
        metrics["eval_accuracy"] = None  # too few pairs for a held-out split
    return metrics


# ---- checks shared with PPO and scoring ----------------------------------------------------------------
def check_reward_model(path: str | None, key: str = "reward_model") -> None:
    """ConfigError unless `path` is a saved one-output sequence classifier with its tokenizer."""
    if not path:
        raise ConfigError(f"{key}: is required: pass --{key.replace('_', '-')} DIR (a reward run's reward_model/)")
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}: folder {path} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}: {path} holds no config.json (not a saved model folder)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}: {config_file} is unreadable ({exc})") from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(f"{key}: {path} is not a reward model (architecture {architectures or 'unknown'})")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
    if labels != 1:
        raise ConfigError(f"{key}: {path} has {labels} outputs; a reward model has one")
    if not (folder / "tokenizer_config.json").is_file():
        raise ConfigError(f"{key}: {path} has no tokenizer (tokenizer_config.json is missing)")


def main(argv: list[str] | None = None) -> int:
    return run_method(RewardModelConfig, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())

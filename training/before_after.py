"""The before/after panel: held-out prompts answered by the parent and the new version, and a KL estimate.

`before_after(...)` loads the base model once with the new adapter (and the parent adapter when the parent is not
the base), answers every prompt with both versions using the same sampling seed, and estimates
KL(new ‖ parent) by Monte Carlo: answers sampled from the new model at temperature 1 (its true distribution),
scored by both versions. `kl_to_parent` sums, over each answer's tokens, the exact KL of the two next-token
distributions (the conditional expectation of log p_new − log p_parent at that token: the same expectation as the
plain estimator, never negative, far less noisy with a handful of answers); `kl_to_parent_sampled` is the plain
mean over answers of sum_t (log p_new(y_t) − log p_parent(y_t)). Used by DPO and PPO after training.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

HELDOUT_FILE = Path(__file__).with_name("heldout_prompts.txt")


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _last_user_text(prompt) -> str:
    """The last user message of a chat prompt (or the prompt itself when it is plain text)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt or [] if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def heldout_prompts(train_rows: list[dict], limit: int, path: str | Path = HELDOUT_FILE) -> list[list[dict]]:
    """Up to `limit` shipped held-out prompts as chats, minus any prompt the training rows contain."""
    trained = {_normalize(_last_user_text(row.get("prompt"))) for row in train_rows}
    chosen = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith("#") and _normalize(text) not in trained:
            chosen.append([{"role": "user", "content": text}])
    return chosen[:limit]


def run_before_after(cfg, adapter_dir: Path, train_rows: list[dict], cancel=None) -> dict | None:
    """The panel for a finished run: held-out prompts (none of `train_rows`' prompts) answered by the parent
    (cfg.init_adapter, or the base) and the new adapter; also written to RUN_DIR/before_after.json.
    None (and no file) when the `cancel` event is set meanwhile: sampling stops within a token."""
    from training.files import write_json

    started = time.monotonic()
    prompts = heldout_prompts(train_rows, cfg.before_after_prompts)
    print(f"before/after: {len(prompts)} held-out prompts", flush=True)
    result = before_after(cfg, adapter_dir, cfg.init_adapter, prompts, cfg.seed, cancel)
    if result is None:
        return None
    result["seconds"] = round(time.monotonic() - started, 1)
    write_json(Path(cfg.out) / "before_after.json", result)
    return result


def before_after(
    cfg, new_adapter_dir, parent_adapter_dir, prompts: list[list[dict]], seed: int, cancel=None
) -> dict | None:
    """{"samples": [{"prompt", "parent", "new"}], "parent_mean_words", "new_mean_words", "kl_to_parent"}.

    cfg supplies base_model, model_cache, before_after_max_new_tokens and before_after_temperature.
    The parent is `parent_adapter_dir` or, when None, the base model (adapters disabled).
    `cancel` (a threading.Event, SIGTERM sets it): once set, generation stops at the next token and this returns None.
    """
    if not prompts:
        return {"samples": [], "parent_mean_words": None, "new_mean_words": None, "kl_to_parent": None}
    import torch
    from peft import PeftModel

    from models.loading import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.base_model, cfg.model_cache, padding_side="left")
    model = PeftModel.from_pretrained(
        load_base_model(cfg.base_model, cfg.model_cache), str(new_adapter_dir), adapter_name="new"
    )
    if parent_adapter_dir:
        model.load_adapter(str(parent_adapter_dir), adapter_name="parent")
    model.eval()
    has_parent = bool(parent_adapter_dir)
    max_new = int(getattr(cfg, "before_after_max_new_tokens", 128))
    temperature = float(getattr(cfg, "before_after_temperature", 0.7))
    device = next(model.parameters()).device
    batch = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    ).to(device)
    try:
        with torch.inference_mode():
            with _as_version(model, "parent", has_parent):
                parent_ids = _sample(model, tokenizer, batch, seed, temperature, max_new, cancel)
            with _as_version(model, "new", has_parent):
                new_ids = _sample(model, tokenizer, batch, seed, temperature, max_new, cancel)
                kl_ids = _sample(model, tokenizer, batch, seed + 1, 1.0, max_new, cancel)  # the new policy's own
                logp_new = _answer_logprobs(model, batch, kl_ids)
            with _as_version(model, "parent", has_parent):
                logp_parent = _answer_logprobs(model, batch, kl_ids)
    except _Cancelled:
        return None
    kl_exact, kl_sampled = _kl_estimates(logp_new, logp_parent, kl_ids, _answer_mask(kl_ids, tokenizer.eos_token_id))
    parent_texts = tokenizer.batch_decode(parent_ids, skip_special_tokens=True)
    new_texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    samples = [
        {"prompt": _last_user_text(p), "parent": a.strip(), "new": b.strip()}
        for p, a, b in zip(prompts, parent_texts, new_texts, strict=True)
    ]
    return {
        "samples": samples,
        "parent_mean_words": _mean_words(parent_texts),
        "new_mean_words": _mean_words(new_texts),
        "kl_to_parent": round(kl_exact, 4),
        "kl_to_parent_sampled": round(kl_sampled, 4),
        "seed": seed,
        "temperature": temperature,
        "max_new_tokens": max_new,
        "parent": str(parent_adapter_dir) if parent_adapter_dir else "base",
    }


@contextlib.contextmanager
def _as_version(model, name: str, has_parent: bool):
    """Run the PeftModel as `name`; the parent without an adapter of its own is the base (adapters disabled)."""
    if name == "parent" and not has_parent:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(name)
    yield


class _Cancelled(Exception):
    """The cancel event was set during sampling: the panel is dropped."""


def _check(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise _Cancelled


def _stop_on(cancel) -> list | None:
    """StoppingCriteria for generate(): every row is done once the `cancel` event is set (none without an event)."""
    if cancel is None:
        return None
    import torch
    from transformers import StoppingCriteria

    class StopOnCancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return [StopOnCancel()]


def _sample(model, tokenizer, batch, seed: int, temperature: float, max_new: int, cancel=None):
    """Answer token ids (prompt removed), sampled with a fixed seed so two versions draw the same random numbers.
    A set `cancel` event ends generation at the next token and raises _Cancelled (cut-short answers are no sample)."""
    import torch

    _check(cancel)
    torch.manual_seed(seed)  # also seeds CUDA
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new,
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=_stop_on(cancel),
    )
    _check(cancel)
    return out[:, batch["input_ids"].shape[1] :]


def _answer_mask(answer_ids, eos_id: int):
    """1 for answer tokens up to and including the first EOS (what follows is padding)."""
    import torch

    is_eos = (answer_ids == eos_id).int()
    after_eos = (torch.cumsum(is_eos, dim=1) - is_eos) > 0
    return (~after_eos).long()


def _answer_logprobs(model, batch, answer_ids):
    """Log-softmax over the vocabulary at every answer position, under the active version: [rows, tokens, vocab]."""
    import torch

    input_ids = torch.cat([batch["input_ids"], answer_ids], dim=1)
    attention = torch.cat([batch["attention_mask"], torch.ones_like(answer_ids)], dim=1)  # causal: pads come last
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generate() used them
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    prompt_len = batch["input_ids"].shape[1]
    return torch.log_softmax(logits[:, prompt_len - 1 : -1].float(), dim=-1)  # the logits predicting each token


def _kl_estimates(logp_new, logp_parent, answer_ids, mask) -> tuple[float, float]:
    """(mean over answers of sum_t exact per-token KL, mean over answers of sum_t sampled log-ratio)."""
    per_token_kl = (logp_new.exp() * (logp_new - logp_parent)).sum(-1)
    index = answer_ids.unsqueeze(-1)
    log_ratio = (logp_new.gather(-1, index) - logp_parent.gather(-1, index)).squeeze(-1)
    return float((per_token_kl * mask).sum(1).mean()), float((log_ratio * mask).sum(1).mean())


def _mean_words(texts: list[str]) -> float:
    return round(sum(len(t.split()) for t in texts) / max(len(texts), 1), 1)

"""Tokens per second on the bundled model: plain `model.generate` one prompt at a time (the baseline) vs the
engine's batched path, same prompts and sampling settings, in one run. Target: batched ≥ 4× the baseline.

    python bench/generation.py [--requests 32] [--baseline-requests 8] [--max-new-tokens 64] [--threads N]

Tokens counted the same way on both sides: answer tokens up to (not including) the end-of-sequence token.
The machine's load average is printed too: other processes on the 2 cores change both numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "Name a fruit and say why people like it.", "What is the capital of France?", "Write a haiku about rain.",
    "Explain gravity to a child.", "Give me three tips for sleeping better.", "What is 12 times 7?",
    "Describe a cat in two sentences.", "Why is the sky blue?", "Suggest a name for a bakery.",
    "How do bees make honey?", "Write a short thank-you note to a teacher.", "What does a compiler do?",
    "List three things to pack for a picnic.", "What is the difference between weather and climate?",
    "Tell me a fun fact about octopuses.", "How can I politely decline an invitation?",
]  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--model-cache", default="data/models")
    parser.add_argument("--requests", type=int, default=32, help="requests sent to the engine at once")
    parser.add_argument("--baseline-requests", type=int, default=8, help="the first N of them, run one at a time")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's)")
    return parser.parse_args()


def answer_tokens(new_ids, eos_ids: set[int]) -> int:
    """Tokens before the first EOS (the rest of a padded row is padding)."""
    for count, token in enumerate(new_ids.tolist()):
        if token in eos_ids:
            return count
    return len(new_ids)


def baseline(engine, requests, eos_ids: set[int]) -> tuple[int, float]:
    """Plain transformers generate, one prompt at a time, same sampling settings."""
    import torch

    tokens, started = 0, time.perf_counter()
    for messages, params, _ in requests:
        ids = torch.tensor([engine.encode(messages)])
        torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = engine.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=params.temperature,
                top_p=params.top_p, max_new_tokens=params.max_new_tokens, pad_token_id=engine.tokenizer.pad_token_id,
            )  # fmt: skip
        tokens += answer_tokens(out[0, ids.shape[1] :], eos_ids)
    return tokens, time.perf_counter() - started


def batched(engine, requests) -> tuple[int, float]:
    started = time.perf_counter()
    results = [future.result() for future in engine.submit_many(requests)]
    return sum(r.token_count for r in results), time.perf_counter() - started


def main() -> None:
    args = parse_args()
    import torch

    from generation.engine import GenerationEngine
    from generation.sampling import SamplingParams

    engine = GenerationEngine(args.model, cache_dir=args.model_cache, max_batch=args.max_batch, threads=args.threads)
    torch.set_num_threads(engine.threads)  # the baseline runs in this thread: same threads on both sides
    requests = [
        ([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
         SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, seed=i), None)
        for i in range(args.requests)
    ]  # fmt: skip
    try:
        warm = SamplingParams(max_new_tokens=4, seed=0)
        engine.submit(requests[0][0], warm).result()  # first-call overheads out of the timings
        base_tokens, base_seconds = baseline(engine, requests[: args.baseline_requests], engine.eos_ids)
        batch_tokens, batch_seconds = batched(engine, requests)
    finally:
        engine.close()
    base_rate, batch_rate = base_tokens / base_seconds, batch_tokens / batch_seconds
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (2 cores)")
    print(f"sequential model.generate: {base_tokens} tokens in {base_seconds:.1f} s = {base_rate:.1f} tok/s "
          f"({args.baseline_requests} requests one at a time)")  # fmt: skip
    print(f"engine, batched:           {batch_tokens} tokens in {batch_seconds:.1f} s = {batch_rate:.1f} tok/s "
          f"({args.requests} requests, max batch {args.max_batch})")  # fmt: skip
    ratio = batch_rate / base_rate
    print(f"speed-up: {ratio:.2f}x (target ≥ 4x)")
    print(json.dumps({"baseline_tok_s": round(base_rate, 1), "batched_tok_s": round(batch_rate, 1),
                      "ratio": round(ratio, 2), "threads": torch.get_num_threads()}))  # fmt: skip


if __name__ == "__main__":
    main()

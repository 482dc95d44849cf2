"""How long the bundled model's answers run when allowed to finish: the share that ends with EOS at each cap.

    python bench/answer_length.py [--cap 768] [--samples 2] [--temperatures 0.7 1.0]

Every seed prompt is answered `--samples` times per temperature with a high cap; the answer lengths give, for
each candidate `--max-new-tokens`, the fraction of answers that would have finished (ended with EOS) — the
default is the smallest round cap at which ≥ 95 % finish (issue: judge answers that end, not cut ones).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CAPS = (128, 160, 192, 256, 320, 384, 448, 512, 640, 768)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--model-cache", default="data/models")
    parser.add_argument("--cap", type=int, default=768, help="the high cap used for the measurement")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    args = parser.parse_args()

    from generation.engine import GenerationEngine
    from generation.sampling import SamplingParams

    prompts = [line.strip() for line in Path("labeling/seed_prompts.txt").read_text().splitlines() if line.strip()]
    engine = GenerationEngine(args.model, cache_dir=args.model_cache)
    requests = [
        ([{"role": "user", "content": p}], SamplingParams(max_new_tokens=args.cap, temperature=t, seed=seed), None)
        for i, p in enumerate(prompts)
        for t in args.temperatures
        for seed in range(1000 * i, 1000 * i + args.samples)
    ]
    started = time.perf_counter()
    results = [f.result() for f in engine.submit_many(requests)]
    seconds = time.perf_counter() - started
    engine.close()
    lengths = sorted(r.token_count for r in results)
    unfinished = sum(r.finish_reason == "length" for r in results)
    print(f"{len(results)} answers in {seconds:.0f} s; {unfinished} still running at the {args.cap}-token cap")
    print(f"tokens: median {lengths[len(lengths) // 2]}, p90 {lengths[int(0.9 * len(lengths))]}, "
          f"p95 {lengths[int(0.95 * len(lengths))]}, max {lengths[-1]}")  # fmt: skip
    for cap in (c for c in CAPS if c <= args.cap):
        finished = sum(r.finish_reason == "eos" and r.token_count < cap for r in results) / len(results)
        print(f"cap {cap:4d}: {100 * finished:5.1f} % end with EOS")


if __name__ == "__main__":
    main()

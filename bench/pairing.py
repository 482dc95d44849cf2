"""Which pairs make votes count? The share of pairs a taste can decide, for ways of picking a pair's two sides.

    python bench/pairing.py [--samples 4] [--max-new-tokens 512] [--repetition-penalty 1.1] [--texts FILE]

Every labeling prompt (bench/loop.py's split) is answered `--samples` times, half at each of the pair queue's two
temperatures. For each taste (bench/tastes.py) it prints the share of *decisive* pairs (exactly one side has the
property: the vote is A or B, not a tie) when a pair is
- `app`: one cool and one hot sample, as labeling/pair_queue.py pairs them now;
- `most different`: the two most different of the samples by a taste-blind distance (different words, different
  length, different layout), which costs `--samples`/2 times the generation.
A tie teaches DPO nothing, so the decisive share is how many of the votes become training pairs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.heldout import prompt_split  # noqa: E402
from bench.tastes import TASTES, paragraphs, words  # noqa: E402
from generation.defaults import repetition_penalty_default  # noqa: E402


def distance(a: str, b: str) -> float:
    """Taste-blind: 1 − Jaccard of the word sets, + |log length ratio|, + |log paragraph-count ratio|."""
    set_a, set_b = set(w.lower() for w in words(a)), set(w.lower() for w in words(b))
    jaccard = len(set_a & set_b) / max(len(set_a | set_b), 1)
    length = abs(math.log((len(words(a)) + 1) / (len(words(b)) + 1)))
    layout = abs(math.log((len(paragraphs(a)) + 1) / (len(paragraphs(b)) + 1)))
    return (1 - jaccard) + length + layout


def most_different(samples: list[str]) -> tuple[str, str]:
    return max(itertools.combinations(samples, 2), key=lambda pair: distance(*pair))


def generate(args) -> list[list[str]]:
    from generation.engine import GenerationEngine
    from generation.sampling import SamplingParams
    from labeling.pair_queue import SELF_TEMPERATURES

    labeling, _ = prompt_split(32)
    engine = GenerationEngine("bundled")
    temps = [SELF_TEMPERATURES[j % 2] for j in range(args.samples)]  # cool, hot, cool, hot, ...
    requests = [
        (
            [{"role": "user", "content": p}],
            SamplingParams(
                temperature=t,
                max_new_tokens=args.max_new_tokens,
                seed=50_000 + 100 * i + j,
                repetition_penalty=args.repetition_penalty,
            ),
            0,
        )
        for i, p in enumerate(labeling)
        for j, t in enumerate(temps)
    ]
    started = time.monotonic()
    texts = [f.result().text for f in engine.submit_many(requests)]
    engine.close()
    print(f"{len(texts)} answers in {time.monotonic() - started:.0f} s")
    return [texts[k : k + args.samples] for k in range(0, len(texts), args.samples)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument(
        "--repetition-penalty", type=float, default=repetition_penalty_default(), help="the app's default unless set"
    )
    parser.add_argument("--texts", help="reuse saved samples (a JSON list of lists) instead of generating")
    parser.add_argument("--out", default="/tmp/prefloop-loop/pairing-samples.json")
    args = parser.parse_args()
    if args.texts:
        groups = json.loads(Path(args.texts).read_text())
    else:
        groups = generate(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(groups))
    for taste in TASTES.values():
        decisive = lambda pairs, t=taste: sum(t.holds(a) != t.holds(b) for a, b in pairs) / len(pairs)  # noqa: E731
        app = [(g[i], g[i + 1]) for g in groups for i in range(0, len(g) - 1, 2)]  # every cool/hot couple
        best = [most_different(g) for g in groups]
        print(
            f"{taste.name:8s} decisive pairs: app {100 * decisive(app):4.0f} % ({len(app)} pairs), "
            f"most different of {len(groups[0])} {100 * decisive(best):4.0f} % ({len(best)} pairs)"
        )


if __name__ == "__main__":
    main()

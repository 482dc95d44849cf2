"""Held-out judging for bench/loop.py and bench/recipes.py: the prompt split, answers with fixed seeds, the verdict.

Held-out prompts are training/heldout_prompts.txt plus, when more are asked for, the last seed prompts; labeling
uses the other seed prompts (labeling/seed_prompts.txt), so no held-out prompt is ever voted on.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from bench.tastes import Taste, is_degenerate, wilson, words

REPO = Path(__file__).resolve().parent.parent
SEED_FILE = REPO / "labeling" / "seed_prompts.txt"
HELDOUT_FILE = REPO / "training" / "heldout_prompts.txt"


def _lines(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#")]


def prompt_split(heldout: int) -> tuple[list[str], list[str]]:
    """(labeling prompts, held-out prompts): the held-out file first, then seed prompts from the end; disjoint."""
    seeds, held = _lines(SEED_FILE), list(dict.fromkeys(_lines(HELDOUT_FILE)))
    for text in reversed(seeds):
        if len(held) >= heldout:
            break
        if text not in held:
            held.append(text)
    held = held[:heldout]
    return [s for s in seeds if s not in held], held


# ---- judging ---------------------------------------------------------------------------------
def answer(
    engine, version: int, prompts: list[str], samples: int, temperature: float, max_new: int, penalty: float
) -> list[dict]:
    """Every held-out prompt answered `samples` times by `version`; seed i*100+j is the same for every version."""
    from generation.sampling import SamplingParams

    requests = [
        (
            [{"role": "user", "content": p}],
            SamplingParams(
                temperature=temperature, max_new_tokens=max_new, seed=7_000 + 100 * i + j, repetition_penalty=penalty
            ),
            version,
        )
        for i, p in enumerate(prompts)
        for j in range(samples)
    ]
    results = [f.result() for f in engine.submit_many(requests)]
    return [{"text": r.text, "truncated": r.finish_reason == "length", "tokens": r.token_count} for r in results]


def parent_answers(
    work_root: Path, engine, prompts, samples, temperature, max_new, penalty
) -> tuple[list[dict], float]:
    """The base model's held-out answers, cached per setting (every taste's parent is the base); (answers, s)."""
    key = f"parent-answers-{len(prompts)}x{samples}-t{temperature}-n{max_new}" + (
        f"-rp{penalty}.json" if penalty != 1.0 else ".json"
    )
    path = work_root / key
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached["prompts"] == prompts:
            return cached["answers"], 0.0
    started = time.monotonic()
    result = answer(engine, 0, prompts, samples, temperature, max_new, penalty)
    path.write_text(json.dumps({"prompts": prompts, "answers": result}))
    return result, round(time.monotonic() - started, 1)


def judge(taste: Taste, parent: list[dict], new: list[dict]) -> dict:
    outcome = Counter(taste.judge(n["text"], p["text"]) for p, n in zip(parent, new, strict=True))
    wins, losses, ties = outcome["A"], outcome["B"], outcome["tie"]
    low, high = wilson(wins, wins + losses)
    share = lambda answers, test: round(sum(test(a) for a in answers) / len(answers), 3)  # noqa: E731
    mean_words = lambda answers: round(sum(len(words(a["text"])) for a in answers) / len(answers), 1)  # noqa: E731
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": round(wins / (wins + losses), 3) if wins + losses else None,
        "ci": [round(low, 3), round(high, 3)],
        "win_rate_ties_half": round((wins + ties / 2) / len(new), 3),
        "taste_before": share(parent, lambda a: taste.holds(a["text"])),
        "taste_after": share(new, lambda a: taste.holds(a["text"])),
        "words_before": mean_words(parent),
        "words_after": mean_words(new),
        "truncated_before": share(parent, lambda a: a["truncated"]),
        "truncated_after": share(new, lambda a: a["truncated"]),
        "degenerate_before": share(parent, lambda a: is_degenerate(a["text"])),
        "degenerate_after": share(new, lambda a: is_degenerate(a["text"])),
        "identical": sum(p["text"] == n["text"] for p, n in zip(parent, new, strict=True)),
    }

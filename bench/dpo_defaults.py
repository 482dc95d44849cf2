"""Measure DPO defaults on the bundled model: does a default run move the model without collapsing it?

1. ~60 preference pairs from the bundled model itself: two sampled answers per prompt of labeling/seed_prompts.txt;
   the rule picks the longer one (more words) as chosen, as a stand-in for "more helpful".
2. `python -m training dpo` (the real child, batch 8, max_length 256) once per setting: the defaults, and the
   setting that collapsed the model in the issue (lr 5e-4, 3 epochs).
3. Held-out prompts (training/heldout_prompts.txt) answered before/after with the same seeds: mean words and
   a Monte-Carlo KL(new ‖ base) per answer, as the app's before/after panel reports them.

Usage: .venv/bin/python bench/dpo_defaults.py [--pairs 60] [--work DIR] [--setting NAME:LR:EPOCHS:BETA:R ...]
Takes ~12 minutes on 2 CPU cores (generation ~2 min, ~10 s per training step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see training/__main__.py

from training.dpo import PrefDPOConfig  # noqa: E402  (needs the repo on sys.path)

DEFAULTS = PrefDPOConfig()
SETTINGS = [
    f"defaults:{DEFAULTS.learning_rate}:{DEFAULTS.epochs}:{DEFAULTS.beta}:{DEFAULTS.lora_r}",
    "half-lr:1e-4:2:0.1:8",
    "issue-collapse:5e-4:3:0.1:8",
]
ANSWER_TOKENS = 160  # long enough that a collapse to a few words is visible (and most answers finish)
HELDOUT = 8  # held-out prompts in the before/after comparison


def make_pairs(n: int, out: Path) -> list[dict]:
    """Two samples per prompt from the bundled model; the rule: the longer answer (more words) is chosen."""
    import torch

    from models.loading import load_base_model, load_tokenizer

    tokenizer = load_tokenizer("bundled", REPO / "data" / "models", padding_side="left")
    model = load_base_model("bundled", REPO / "data" / "models")
    prompts = [p.strip() for p in (REPO / "labeling" / "seed_prompts.txt").read_text().splitlines() if p.strip()][:n]
    rows = []
    for start in range(0, len(prompts), 10):  # 10 prompts × 2 samples per batch
        chunk = prompts[start : start + 10]
        chats = [[{"role": "user", "content": p}] for p in chunk for _ in range(2)]
        batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                              return_dict=True)  # fmt: skip
        torch.manual_seed(start)
        with torch.inference_mode():
            ids = model.generate(**batch, do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=ANSWER_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        answers = ids[:, batch["input_ids"].shape[1] :]
        for i, prompt in enumerate(chunk):
            a, b = (_answer(tokenizer, answers[2 * i + k]) for k in range(2))
            good, bad = (a, b) if _score(a) >= _score(b) else (b, a)
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": good[0]}],
                         "rejected": [{"role": "assistant", "content": bad[0]}]})  # fmt: skip
        print(f"  pairs: {len(rows)}/{len(prompts)}", flush=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def _answer(tokenizer, ids) -> tuple[str, bool]:
    finished = bool((ids == tokenizer.eos_token_id).any())
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), finished


def _score(answer: tuple[str, bool]) -> int:
    return len(answer[0].split())


def train(name: str, data: Path, work: Path, lr: str, epochs: str, beta: str, rank: str) -> dict:
    out = work / f"run-{name}"
    cmd = [sys.executable, "-m", "training", "dpo", "--data", str(data), "--out", str(out), "--batch-size", "8",
           "--max-length", "256", "--learning-rate", lr, "--epochs", epochs, "--beta", beta, "--lora-r", rank,
           "--lora-alpha", str(2 * int(rank)), "--before-after-prompts", str(HELDOUT),
           "--before-after-max-new-tokens", str(ANSWER_TOKENS)]  # fmt: skip
    done = _finished_run(out, lr, epochs, beta, rank)
    if done:
        print(f"  reusing the finished run in {out}")
        return done
    started = time.monotonic()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    with (work / f"{name}.log").open("w") as log:
        code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"{name}: training failed, see {work / f'{name}.log'}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = round(time.monotonic() - started, 1)
    (out / "bench_wall.json").write_text(json.dumps({"wall_s": metrics["wall_s"]}))
    return metrics


def _finished_run(out: Path, lr: str, epochs: str, beta: str, rank: str) -> dict | None:
    """A run of this same setting that already ended in this work folder (reruns only add what is missing)."""
    import yaml

    try:
        config = yaml.safe_load((out / "run.yaml").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    same = (config["learning_rate"], config["epochs"], config["beta"], config["lora_r"]) == (
        float(lr), float(epochs), float(beta), int(rank))  # fmt: skip
    if not same:
        return None
    wall = out / "bench_wall.json"
    if wall.is_file():
        metrics["wall_s"] = json.loads(wall.read_text())["wall_s"]
    else:  # run.yaml is written right after start-up; the end line closes the run
        end = json.loads((out / "progress.jsonl").read_text().splitlines()[-1])["time"]
        metrics["wall_s"] = round(end - (out / "run.yaml").stat().st_mtime, 1)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--work", default=str(REPO / "data" / "bench-dpo-defaults"))
    parser.add_argument("--setting", action="append", help="NAME:LR:EPOCHS:BETA:LORA_R (repeatable)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"pairs-{args.pairs}.jsonl"
    started = time.monotonic()
    if data.is_file():
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        print(f"reusing {len(rows)} pairs from {data}")
    else:
        print(f"generating {args.pairs} pairs with the bundled model ...", flush=True)
        rows = make_pairs(args.pairs, data)
    chosen_words = sum(len(r["chosen"][0]["content"].split()) for r in rows) / len(rows)
    rejected_words = sum(len(r["rejected"][0]["content"].split()) for r in rows) / len(rows)
    print(f"{len(rows)} pairs: chosen {chosen_words:.0f} words on average, rejected {rejected_words:.0f}")
    results = []
    for setting in args.setting or SETTINGS:
        name, lr, epochs, beta, rank = setting.split(":")
        print(f"training {name}: lr {lr}, {epochs} epochs, beta {beta}, LoRA r {rank} ...", flush=True)
        results.append((name, lr, epochs, beta, rank, train(name, data, work, lr, epochs, beta, rank)))
    header = (f"{'setting':<16}{'lr':>8}{'epochs':>7}{'beta':>6}{'r':>4}{'steps':>6}{'acc':>6}{'margin':>8}"
              f"{'words before':>13}{'words after':>12}{'KL/answer':>10}{'wall s':>8}")  # fmt: skip
    print("\n" + header)
    for name, lr, epochs, beta, rank, m in results:
        ba = m.get("before_after", {})
        print(f"{name:<16}{lr:>8}{epochs:>7}{beta:>6}{rank:>4}{m['steps']:>6}{m['reward_accuracy'] or 0:>6.2f}"
              f"{m['reward_margin'] or 0:>8.2f}{ba.get('parent_mean_words') or 0:>13.1f}"
              f"{ba.get('new_mean_words') or 0:>12.1f}{ba.get('kl_to_parent') or 0:>10.2f}"
              f"{m['wall_s']:>8.0f}")  # fmt: skip
    for name, *_, m in results:
        sample = (m.get("before_after", {}).get("samples") or [{}])[0]
        print(f"\n[{name}] {sample.get('prompt')}\n  before: {sample.get('parent', '')[:300]!r}"
              f"\n  after:  {sample.get('new', '')[:300]!r}")  # fmt: skip
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

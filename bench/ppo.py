"""PPO speed on this machine: `python -m training ppo` (our path) against a plain TRL script, same settings and seed.

    python bench/ppo.py [--episodes 20] [--batch-size 4] [--response-length 24] [--repeat 2] [--reward-model DIR]

Both runs use the bundled model, the same reward model (trained here first on the toy rule unless --reward-model
is given), the same prompts, LoRA, PPOConfig and seed. Reported per run: seconds per PPO update (the fastest and
the median of updates 2..N; the first update is reported apart: on these VMs it also pays first-touch memory,
which varied from 15 s to 300 s with the machine's load) and episodes/s at the fastest update, and the wall time
of the whole process (imports, loading, saving). The ratio ours / plain of seconds per update is the overhead of
our layer (target ≤ 1.05). Our run is measured without and with the before/after samples (which only add wall time
after training). Runs alternate plain / ours so a change in machine load hits both; updates of all `--repeat` runs
are pooled per kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.datahelpers import TOPICS  # noqa: E402

SEED = 42
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}  # PPORunConfig's defaults
PPO_SETTINGS = {"learning_rate": 1e-4, "kl_coef": 0.05, "num_ppo_epochs": 4, "num_mini_batches": 1,
                "temperature": 0.7, "vf_coef": 0.1, "cliprange": 0.2}  # fmt: skip
KINDS = ("plain", "ours")
BEFORE_AFTER_PROMPTS = 4  # CommonConfig's default
# Both children get the same environment, incl. the passive OpenMP wait that `python -m training` sets for itself
# (training/__main__.py): without it the plain script's spinning threads ran ~10x slower on 2 busy cores.
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}  # fmt: skip


def write_inputs(work: Path) -> tuple[Path, Path]:
    """prompts.jsonl (one prompt per topic) and reward.jsonl (friendly sentence beats "No.")."""
    prompts, pairs = [], []
    for topic in TOPICS:
        prompts.append({"prompt": [{"role": "user", "content": f"Tell me one fact about {topic}."}]})
    for i in range(40):
        topic = TOPICS[i % len(TOPICS)]
        good = f"Happy to help! Here is a fact about {topic}: it has a long and interesting history."
        pairs.append({"prompt": [{"role": "user", "content": f"Tell me one fact about {topic} (#{i})."}],
                      "chosen": [{"role": "assistant", "content": good}],
                      "rejected": [{"role": "assistant", "content": "No."}]})  # fmt: skip
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (work / "reward.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return work / "prompts.jsonl", work / "reward.jsonl"


def _run(cmd: list[str], log: Path) -> float:
    """Run a child with its output in `log`; returns its wall seconds."""
    started = time.monotonic()
    with log.open("w") as handle:
        code = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed (exit {code}); see {log}")
    return time.monotonic() - started


def train_reward_model(work: Path, data: Path) -> Path:
    out = work / "reward-run"
    cmd = [sys.executable, "-m", "training", "reward", "--data", str(data), "--out", str(out), "--max-steps", "6"]
    _run(cmd, work / "reward-run.log")
    return out / "reward_model"


def run_ours(work: Path, name: str, prompts: Path, reward_model: Path, args, before_after: int) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "training", "ppo", "--data", str(prompts), "--out", str(out),
           "--reward-model", str(reward_model), "--total-episodes", str(args.episodes),
           "--batch-size", str(args.batch_size), "--response-length", str(args.response_length),
           "--seed", str(SEED), "--before-after-prompts", str(before_after)]  # fmt: skip
    wall = _run(cmd, work / f"{name}.log")
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    start = next(e["time"] for e in events if e["event"] == "start")
    logged = [e["time"] for e in events if e["event"] == "progress"]
    return _result(name, start, logged, wall, args)


def run_plain(work: Path, name: str, prompts: Path, reward_model: Path, args) -> dict:
    out = work / name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-worker", "--work", str(out), "--prompts",
           str(prompts), "--reward-model", str(reward_model), "--episodes", str(args.episodes), "--batch-size",
           str(args.batch_size), "--response-length", str(args.response_length)]  # fmt: skip
    wall = _run(cmd, work / f"{name}.log")
    times = json.loads((out / "times.json").read_text())
    return _result(name, times["start"], times["logged"], wall, args)


def _result(name: str, start: float, logged: list[float], wall: float, args) -> dict:
    """Per-update seconds from the log times. The first update also pays one-time costs (first-touch memory, warm
    caches) and is reported apart; of the others, the fastest is the least disturbed by other load on the machine."""
    durations = [b - a for a, b in zip(logged, logged[1:], strict=False)]
    fastest, median = min(durations), statistics.median(durations)
    return {"run": name, "updates": len(logged), "first_update_s": round(logged[0] - start, 1),
            "s_per_update": round(fastest, 2), "median_s_per_update": round(median, 2),
            "episodes_per_s": round(args.batch_size / fastest, 3), "loop_s": round(logged[-1] - start, 1),
            "wall_s": round(wall, 1), "durations": [round(d, 2) for d in durations]}  # fmt: skip


def plain_worker(args) -> None:
    """The plain TRL script: what a user would write by hand with the same models, data and settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
        set_seed,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from models.loading import resolve_model

    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_model("bundled", REPO / "data" / "models")
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    tokenizer.pad_token = "<|endoftext|>"  # a pad token that is not the end-of-turn token, as our path uses
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()][: args.episodes]
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in prompts]  # fmt: skip
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", **LORA))
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    config = PPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size, total_episodes=args.episodes,
        response_length=args.response_length, stop_token="eos", num_sample_generations=0, report_to="none",
        save_strategy="no", logging_steps=1, seed=SEED, use_cpu=True, bf16=False, gradient_checkpointing=False,
        disable_tqdm=True, **PPO_SETTINGS,
    )  # fmt: skip
    times: dict = {"start": None, "logged": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["start"] = time.time()

        def on_log(self, *a, **k):
            times["logged"].append(time.time())

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_dict({"input_ids": ids}),
                         callbacks=[Clock()])  # fmt: skip
    trainer.train()
    policy.save_pretrained(out / "adapter")
    (out / "times.json").write_text(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20, help="episodes per run (updates = episodes / batch)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=2, help="alternating plain/ours pairs; the best is reported")
    parser.add_argument("--reward-model", help="reuse a reward_model/ folder instead of training one")
    parser.add_argument("--work", help="work folder (default: a temp folder)")
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.episodes < 2 * args.batch_size:
        parser.error("--episodes must give at least 2 updates (the first one is reported apart)")
    if args.plain_worker:
        plain_worker(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-ppo-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts, pairs = write_inputs(work)
    reward_model = Path(args.reward_model) if args.reward_model else train_reward_model(work, pairs)
    print(f"bundled model, {args.episodes} episodes × {args.response_length} tokens, batch {args.batch_size}; "
          f"work {work}", flush=True)  # fmt: skip
    results = []
    for i in range(args.repeat):
        for kind in KINDS:
            if kind == "plain":
                result = run_plain(work, f"plain-{i}", prompts, reward_model, args)
            else:
                result = run_ours(work, f"ours-{i}", prompts, reward_model, args, before_after=0)
            print(json.dumps(result), flush=True)
            results.append(result)
    with_ba = run_ours(work, "ours-before-after", prompts, reward_model, args, before_after=BEFORE_AFTER_PROMPTS)
    print(json.dumps(with_ba), flush=True)
    pooled = {kind: [d for r in results if r["run"].startswith(kind) for d in r["durations"]] for kind in KINDS}
    walls = {kind: min(r["wall_s"] for r in results if r["run"].startswith(kind)) for kind in KINDS}
    for kind in KINDS:
        fastest, median = min(pooled[kind]), statistics.median(pooled[kind])
        print(f"{kind:<6}: {fastest:.2f} s/update fastest, {median:.2f} median ({len(pooled[kind])} updates), "
              f"{args.batch_size / fastest:.3f} episodes/s, wall {walls[kind]:.0f} s")  # fmt: skip
    print(f"ours with before/after ({BEFORE_AFTER_PROMPTS} prompts): wall {with_ba['wall_s']:.0f} s")
    ratio = min(pooled["ours"]) / min(pooled["plain"])
    median_ratio = statistics.median(pooled["ours"]) / statistics.median(pooled["plain"])
    print(f"ratio ours/plain, fastest update: {ratio:.3f} (target ≤ 1.05); median update: {median_ratio:.3f}")


if __name__ == "__main__":
    main()

"""How much does the app's training path cost over a plain TRL script? Target: ratio ≤ 1.05.

The same DPO run (bundled model, same preference data, LoRA, steps, batch, seed) is timed twice, each as a fresh
process from start to saved adapter:
- the app's path: JobRunner.submit → DuckDB snapshot → `python -m training dpo` child → progress.jsonl, adapter,
  metrics → the runner registers a model version (with the before/after panel switched off, and once with it on);
- a plain TRL script: load model and data, DPOTrainer with the same LoraConfig/DPOConfig, train, save.
Each path runs --repeats times alternately and the fastest run counts (other load on 2 shared cores is noise).

Usage: .venv/bin/python bench/train_overhead.py [--steps 8] [--repeats 2] [--before-after-prompts 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The app's children sleep idle OpenMP threads (training/__main__.py); the plain script gets the same policy so
# that only the app's own overhead is compared (the default spin policy is far slower on busy shared cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from models.loading import resolve_model  # noqa: E402  (needs the repo on sys.path)
from storage.db import Store  # noqa: E402
from tests.datahelpers import seed_preferences  # noqa: E402
from training.runner import JobRunner  # noqa: E402

MODEL_CACHE = REPO / "data" / "models"
SETTINGS = {"batch_size": 4, "max_length": 128, "learning_rate": 5e-5, "beta": 0.1, "seed": 42, "lora_r": 8,
            "lora_alpha": 16, "lora_dropout": 0.0}  # fmt: skip

PLAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model_dir, data, out, steps, s = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=data, split="train")
    args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=s["batch_size"],
                     learning_rate=s["learning_rate"], beta=s["beta"], max_length=s["max_length"], seed=s["seed"],
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                     gradient_checkpointing=False)
    lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    trainer.save_model(out)
    print(json.dumps({"train_runtime": result.metrics["train_runtime"]}))
""")


def run_app_path(work: Path, steps: int, before_after_prompts: int, tag: str) -> tuple[float, float, Path]:
    """(wall seconds from submit to registered version, trainer's own train_runtime, the run's data snapshot)."""
    store = Store(work / f"app-{tag}.duckdb")
    try:
        seed_preferences(store, 40)
        runner = JobRunner(store, runs_dir=work / f"runs-{tag}", base_model="bundled", model_cache=MODEL_CACHE)
        settings = {**SETTINGS, "max_steps": steps, "before_after_prompts": before_after_prompts}
        started = time.monotonic()
        status = runner.wait(runner.submit("dpo", settings), timeout=1800)
        wall = time.monotonic() - started
    finally:
        store.close()
    if status.status != "succeeded":
        raise SystemExit(f"app path failed: {status.error}")
    return wall, float(status.metrics.get("train_runtime") or 0), Path(status.run_dir) / "data.jsonl"


def run_plain(work: Path, data: Path, steps: int, tag: str) -> tuple[float, float]:
    script = work / "plain_dpo.py"
    script.write_text(PLAIN_SCRIPT, encoding="utf-8")
    model_dir = resolve_model("bundled", MODEL_CACHE)
    cmd = [sys.executable, str(script), model_dir, str(data), str(work / f"plain-{tag}"), str(steps),
           json.dumps(SETTINGS)]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"plain TRL script failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])["train_runtime"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--before-after-prompts", type=int, default=4, help="for the extra run with the panel on")
    args = parser.parse_args()
    resolve_model("bundled", MODEL_CACHE)  # convert once up front, outside every timing
    app, plain = [], []
    with tempfile.TemporaryDirectory(prefix="prefloop-overhead-") as tmp:
        work = Path(tmp)
        for i in range(args.repeats):
            wall, runtime, data = run_app_path(work, args.steps, 0, f"{i}")
            app.append((wall, runtime))
            print(f"app path (no before/after) #{i + 1}: {wall:.1f} s wall, {runtime:.1f} s training", flush=True)
            plain.append(run_plain(work, data, args.steps, f"{i}"))
            print(f"plain TRL script #{i + 1}:          {plain[-1][0]:.1f} s wall, {plain[-1][1]:.1f} s training",
                  flush=True)  # fmt: skip
        panel = None
        if args.before_after_prompts:
            panel = run_app_path(work, args.steps, args.before_after_prompts, "panel")
            print(f"app path with before/after ({args.before_after_prompts} prompts): {panel[0]:.1f} s wall")
    best_app, best_plain = min(app), min(plain)
    print(f"\nDPO, bundled model, {args.steps} steps, batch {SETTINGS['batch_size']}, max_length "
          f"{SETTINGS['max_length']}, best of {args.repeats}:")  # fmt: skip
    print(f"  wall time, process start → saved adapter: app {best_app[0]:.1f} s, plain TRL {best_plain[0]:.1f} s, "
          f"ratio {best_app[0] / best_plain[0]:.3f} (target ≤ 1.05)")  # fmt: skip
    print(
        f"  trainer.train() alone:                     app {min(r for _, r in app):.1f} s, plain TRL "
        f"{min(r for _, r in plain):.1f} s, ratio {min(r for _, r in app) / min(r for _, r in plain):.3f}"
    )
    if panel:
        print(f"  app with the before/after panel on: {panel[0]:.1f} s, ratio {panel[0] / best_plain[0]:.3f} "
              f"(the panel's sampling is extra work, not overhead)")  # fmt: skip


if __name__ == "__main__":
    main()

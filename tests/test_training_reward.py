"""Reward model training (`python -m training reward`) and scoring (`python -m training score`), on real models.

The preference rule is the one tests/datahelpers.py writes into the store: a friendly full sentence beats "No.".
Rows are written in the reward export's format (prompt = chat, chosen / rejected = one assistant message).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see training/__main__.py

from tests.datahelpers import TOPICS

REPO = Path(__file__).resolve().parent.parent
TINY_STEPS = 8  # enough for the tiny random model to separate the toy rule (checked: held-out accuracy 1.0)
BUNDLED_STEPS = 6  # ≈ 15 s on 2 idle cores; held-out accuracy 1.0 measured


def toy_reward_rows(n: int = 40) -> list[dict]:
    """n reward-export rows: the chosen answer is a friendly full sentence, the rejected one a curt "No."."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        good = f"Happy to help! Here is a fact about {topic}: it has a long and interesting history."
        rows.append({
            "prompt": [{"role": "user", "content": f"Tell me one fact about {topic} (#{i})."}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": "No."}],
        })  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]


def run_in_process(module_main, argv: list[str]) -> int:
    """A method's main() in this process; run_method's SIGTERM handler is undone afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return module_main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m training ...` as the runner starts it."""
    env_extra = {"TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env_extra})  # fmt: skip


def train_reward_model(base_model: Path | str, run_dir: Path, steps: int, learning_rate: float) -> Path:
    """Train on the toy rule; returns RUN_DIR/reward_model."""
    from training import reward

    data = write_jsonl(run_dir.parent / f"{run_dir.name}-data.jsonl", toy_reward_rows())
    argv = ["--data", str(data), "--out", str(run_dir), "--base-model", str(base_model), "--max-steps", str(steps),
            "--learning-rate", str(learning_rate), "--model-cache", str(REPO / "data" / "models")]  # fmt: skip
    assert run_in_process(reward.main, argv) == 0, (run_dir / "progress.jsonl").read_text()
    return run_dir / "reward_model"


def cached_reward_model(tmp_path_factory, name: str, base_model: Path | str, steps: int, lr: float) -> Path:
    """One reward model per test session, shared by the reward and the PPO tests."""
    run_dir = tmp_path_factory.getbasetemp() / f"shared-{name}-reward-run"
    if not (run_dir / "reward_model" / "config.json").is_file():
        train_reward_model(base_model, run_dir, steps, lr)
    return run_dir / "reward_model"


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    return cached_reward_model(tmp_path_factory, "tiny", tiny_model_dir, TINY_STEPS, 1e-3)


# ---- reward training -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_reward_model_learns_the_toy_rule(tmp_path_factory, bundled_model_dir):
    """Held-out pairwise accuracy above chance, reported live (eval events) and in the final metrics."""
    from transformers import AutoModelForSequenceClassification

    from training.score import score_rows

    model_dir = cached_reward_model(tmp_path_factory, "bundled", "bundled", BUNDLED_STEPS, 1e-4)
    run_dir = model_dir.parent
    events = read_events(run_dir)
    assert (events[0]["event"], events[0]["total"]) == ("start", BUNDLED_STEPS)
    steps = [e for e in events if e["event"] == "progress"]
    assert len(steps) == BUNDLED_STEPS and all(isinstance(e["accuracy"], float) for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) >= 2 and all(0 <= e["accuracy"] <= 1 for e in evals)
    assert evals[-1]["margin"] > evals[0]["margin"]  # it learns, beyond what the random head happened to prefer
    end = events[-1]
    assert end["event"] == "end" and end["status"] == "succeeded"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_rows"] == 4 and metrics["train_rows"] == 36  # 10 % of 40 held out
    assert metrics["eval_accuracy"] > 0.5

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert model.config.pad_token_id != model.config.eos_token_id  # the head must see the end-of-turn token
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged, a plain classifier

    fresh = toy_reward_rows(60)[40:]  # prompts the model never saw (other numbers)
    scored = score_rows(fresh, model_dir)
    wins = sum(r["chosen_score"] > r["rejected_score"] for r in scored)
    assert wins / len(scored) > 0.9


def test_reward_run_accepts_the_runner_config(tmp_path, tiny_model_dir):
    """run.yaml with exactly the keys training/runner.py writes for a reward run (incl. init_adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training import reward

    adapter = tmp_path / "parent-adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4)).save_pretrained(adapter)
    run_dir = tmp_path / "run-0001-reward"
    data = write_jsonl(tmp_path / "data.jsonl", toy_reward_rows(12))
    settings = {
        "max_steps": 3,
        "learning_rate": 1e-3,
        "epochs": 1,
        "batch_size": 2,
        "max_length": 64,
        "seed": 7,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
    }  # labeling/ui_train.py's reward keys
    config = {
        **settings,
        "data": str(data),
        "out": str(run_dir),
        "base_model": str(tiny_model_dir),
        "model_cache": str(REPO / "data" / "models"),
        "base_version": 3,
        "init_adapter": str(adapter),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    assert run_in_process(reward.main, ["--config", str(tmp_path / "run.yaml")]) == 0
    events = read_events(run_dir)
    assert events[0]["total"] == 3 and events[-1]["status"] == "succeeded"
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert events[-1]["metrics"]["eval_rows"] == 1  # 10 % of 12 rounds to 1
    resolved = yaml.safe_load((run_dir / "run.yaml").read_text())  # the child's one config file, defaults added
    assert resolved["lora_r"] == 4 and resolved["center_rewards_coefficient"] == 0.01
    assert not (run_dir / "config.yaml").exists()
    assert (run_dir / "reward_model" / "model.safetensors").is_file()


def test_bad_reward_rows_fail_with_one_message_and_no_model(tmp_path, tiny_model_dir):
    from training import reward

    rows = toy_reward_rows(6)
    del rows[4]["rejected"]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    run_dir = tmp_path / "run"
    code = run_in_process(reward.main, ["--data", str(data), "--out", str(run_dir), "--base-model",
                                        str(tiny_model_dir)])  # fmt: skip
    assert code == 1
    end = read_events(run_dir)[-1]
    assert end["status"] == "failed" and "row 5" in end["error"] and "rejected" in end["error"]
    assert not (run_dir / "reward_model").exists()


# ---- scoring -------------------------------------------------------------------------------------------
def test_score_cli_scores_pairs_and_answers(tmp_path, tiny_reward_model):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_reward_rows(60)[40:])
    result = run_cli("score", "--reward-model", str(tiny_reward_model), "--data", str(pairs),
                     "--out", str(tmp_path / "scored.jsonl"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 20 and scored[0]["prompt"] == toy_reward_rows(60)[40]["prompt"]
    chosen = sum(r["chosen_score"] for r in scored) / len(scored)
    rejected = sum(r["rejected_score"] for r in scored) / len(scored)
    assert chosen > rejected

    answers = [{"generation_id": 11, "prompt": "Tell me one fact about owls.", "answer": "No."},
               {"generation_id": 12, "prompt": [{"role": "user", "content": "Tell me one fact about owls."}],
                "answer": [{"role": "assistant", "content": "Happy to help! Here is a fact about owls: it has a "
                                                            "long and interesting history."}]}]  # fmt: skip
    data = write_jsonl(tmp_path / "answers.jsonl", answers)
    result = run_cli("score", "--reward-model", str(tiny_reward_model), "--data", str(data),
                     "--out", str(tmp_path / "answers.parquet"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "answers.parquet").to_pylist()
    assert [r["generation_id"] for r in table] == [11, 12]
    assert table[1]["score"] > table[0]["score"]


def test_score_without_a_reward_model_is_one_clear_error(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_reward_rows(2))
    out = tmp_path / "scored.jsonl"
    missing = run_cli("score", "--data", str(data), "--out", str(out))
    assert missing.returncode == 2 and "error: reward_model: is required" in missing.stderr
    causal = run_cli("score", "--reward-model", str(tiny_model_dir), "--data", str(data), "--out", str(out))
    assert causal.returncode == 2 and "is not a reward model" in causal.stderr
    assert not out.exists()

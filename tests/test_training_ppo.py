"""LoRA PPO (`python -m training ppo`) against a reward model trained on the toy rule, on real models and real TRL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see training/__main__.py

from tests.datahelpers import TOPICS
from tests.test_training_reward import (
    BUNDLED_STEPS,
    REPO,
    TINY_STEPS,
    cached_reward_model,
    read_events,
    run_cli,
    run_in_process,
    write_jsonl,
)  # fmt: skip

PPO_METRICS = ("reward", "kl", "policy_loss", "value_loss", "clip_fraction", "entropy")
MODEL_CACHE = str(REPO / "data" / "models")


def prompt_rows(n: int = len(TOPICS)) -> list[dict]:
    """Prompt rows as the runner writes them for PPO ({"prompt": chat})."""
    return [{"prompt": [{"role": "user", "content": f"Tell me one fact about {TOPICS[i % len(TOPICS)]}."}]}
            for i in range(n)]  # fmt: skip


def lora_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    return cached_reward_model(tmp_path_factory, "tiny", tiny_model_dir, TINY_STEPS, 1e-3)


@pytest.mark.slow
def test_ppo_on_the_bundled_model_trains_the_adapter_not_the_base(tmp_path, tmp_path_factory, bundled_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training import ppo

    reward_model = cached_reward_model(tmp_path_factory, "bundled", "bundled", BUNDLED_STEPS, 1e-4)
    base_file = bundled_model_dir / "model.safetensors"
    base_hash = sha256(base_file)
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows())
    run_dir = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(run_dir), "--reward-model", str(reward_model), "--model-cache",
            MODEL_CACHE, "--total-episodes", "8", "--batch-size", "4", "--response-length", "12",
            "--before-after-prompts", "1", "--before-after-max-new-tokens", "8"]  # fmt: skip
    assert run_in_process(ppo.main, argv) == 0, (run_dir / "progress.jsonl").read_text()

    events = read_events(run_dir)
    assert (events[0]["event"], events[0]["total"]) == ("start", 2)
    updates = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in updates] == [1, 2]
    assert all(isinstance(e[name], float) for e in updates for name in PPO_METRICS)
    assert events[-1]["status"] == "succeeded"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["updates"] == 2 and metrics["episodes"] == 8
    assert metrics["reference"].startswith("base model")
    assert len(metrics["before_after"]["samples"]) == 1 and (run_dir / "before_after.json").is_file()

    lora_b = {k: v for k, v in lora_tensors(run_dir / "adapter").items() if "lora_B" in k}
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b.values())  # lora_B starts at zero
    assert sha256(base_file) == base_hash
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundled_model_dir), run_dir / "adapter")
    base = AutoModelForCausalLM.from_pretrained(bundled_model_dir)
    layer = "model.layers.0.self_attn.q_proj"
    assert policy.get_submodule(f"base_model.model.{layer}.base_layer").weight.equal(base.get_submodule(layer).weight)


def test_ppo_runs_from_the_runner_config_and_continues_the_parent_adapter(tmp_path, tiny_model_dir, tiny_reward_model):
    """run.yaml with the keys training/runner.py writes for the browser chain test; init_adapter is continued."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training import ppo

    parent = tmp_path / "parent-adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)).save_pretrained(parent)
    run_dir = tmp_path / "run-0002-ppo"
    data = write_jsonl(tmp_path / "data.jsonl", prompt_rows(5))
    settings = {
        "max_steps": 2,
        "batch_size": 2,
        "max_length": 64,
        "total_episodes": 4,
        "response_length": 8,
        "learning_rate": 1e-3,
        "epochs": 1,
        "seed": 3,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "kl_coef": 0.05,
    }  # the form's settings minus reward_model and beta (labeling/ui_train.py)
    config = {**settings, "reward_model": str(tiny_reward_model), "reward_model_version": 5, "data": str(data),
              "out": str(run_dir), "base_model": str(tiny_model_dir), "model_cache": MODEL_CACHE,
              "base_version": 4, "init_adapter": str(parent), "prompts": str(data)}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    assert run_in_process(ppo.main, ["--config", str(tmp_path / "run.yaml"), "--before-after-prompts", "0"]) == 0
    events = read_events(run_dir)
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2]
    metrics = events[-1]["metrics"]
    assert metrics["reference"].startswith("parent adapter") and metrics["reward_model_version"] == 5
    before, after = lora_tensors(parent), lora_tensors(run_dir / "adapter")
    assert before.keys() == after.keys()  # only the trained adapter is saved, not the frozen "ref" copy
    assert any(not before[k].equal(after[k]) for k in before)


def test_ppo_without_a_valid_reward_model_is_a_clear_error(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(4))
    for name, extra, message in (
        ("missing", [], "reward_model: is required"),
        ("nofolder", ["--reward-model", str(tmp_path / "nope")], "does not exist"),
        ("causal", ["--reward-model", str(tiny_model_dir)], "is not a reward model"),
    ):
        run_dir = tmp_path / name
        result = run_cli("ppo", "--data", str(data), "--out", str(run_dir), "--base-model", str(tiny_model_dir),
                         *extra)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert f"error: {message}" in result.stderr or message in result.stderr
        end = read_events(run_dir)[-1]
        assert end["event"] == "end" and end["status"] == "failed" and message in end["error"]
        assert not (run_dir / "adapter").exists()


def test_sigterm_cancels_ppo_between_updates_and_keeps_the_adapter(tmp_path, tiny_model_dir, tiny_reward_model):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "training", "ppo", "--data", str(data), "--out", str(run_dir), "--base-model",
           str(tiny_model_dir), "--reward-model", str(tiny_reward_model), "--total-episodes", "400",
           "--batch-size", "2", "--response-length", "4", "--num-ppo-epochs", "1"]  # fmt: skip
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            if (run_dir / "progress.jsonl").is_file() and '"progress"' in (run_dir / "progress.jsonl").read_text():
                break
            time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, stderr
    events = read_events(run_dir)
    end = events[-1]
    assert end["status"] == "cancelled"
    assert end["metrics"]["updates"] < 200 and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "before_after" not in end["metrics"]

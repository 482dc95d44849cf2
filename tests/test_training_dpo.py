"""The DPO training child as the app and the CLI run it: `python -m training dpo ...` on the tiny model."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see training/__main__.py

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from training.before_after import HELDOUT_FILE, before_after, heldout_prompts
from training.common import CommonConfig
from training.configparse import ConfigError, parse_config
from training.dpo import PrefDPOConfig

REPO = Path(__file__).resolve().parent.parent
QUICK = "--batch-size 2 --max-length 64 --before-after-prompts 2 --before-after-max-new-tokens 8".split()
PROGRESS_FIELDS = {"event", "time", "step", "total", "epoch", "loss", "learning_rate", "elapsed", "eta",
                   "reward_accuracy", "reward_margin"}  # fmt: skip
FIRST_HELDOUT = next(line for line in HELDOUT_FILE.read_text().splitlines() if line and not line.startswith("#"))


def pair_rows(n: int) -> list[dict]:
    """Chat-style pairs as storage.exporters writes them; row 0 uses the first held-out prompt (must be skipped)."""
    rows = []
    for i in range(n):
        text = FIRST_HELDOUT if i == 0 else f"Tell me one fact about tea (#{i})."
        rows.append({"prompt": [{"role": "user", "content": text}],
                     "chosen": [{"role": "assistant", "content": "Happy to help! Tea has a long history."}],
                     "rejected": [{"role": "assistant", "content": "No."}]})  # fmt: skip
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_child(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", "dpo", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]


def lora_b(adapter: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """One real 3-step run from a parquet snapshot, shared by the tests that inspect its outputs."""
    work = tmp_path_factory.mktemp("dpo")
    data = work / "snapshot.parquet"
    pq.write_table(pa.Table.from_pylist(pair_rows(8)), data)
    run_dir = work / "run"
    done = run_child("--data", str(data), "--out", str(run_dir), "--base-model", str(tiny_model_dir),
                     "--max-steps", "3", "--learning-rate", "1e-3", "--full-rate-steps", "2",
                     "--eval-fraction", "0.25", *QUICK)  # fmt: skip
    return run_dir, done


def test_progress_lines_have_the_contract_fields(trained_run):
    run_dir, done = trained_run
    assert done.returncode == 0, done.stderr[-2000:]
    lines = events(run_dir)
    assert [e["event"] for e in lines] == ["start", "progress", "progress", "progress", "eval", "end"]
    assert lines[0]["total"] == 3
    assert lines[4]["step"] == 3 and {"loss", "reward_accuracy", "reward_margin"} <= lines[4].keys()  # 2 held-out rows
    for line in lines[1:4]:
        assert PROGRESS_FIELDS <= line.keys(), PROGRESS_FIELDS - line.keys()
        assert line["total"] == 3 and math.isfinite(line["loss"]) and line["learning_rate"] > 0
    assert [e["step"] for e in lines[1:4]] == [1, 2, 3]
    assert lines[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # fresh LoRA: policy == reference at step 1
    assert lines[3]["reward_margin"] > 0  # the chosen side pulls ahead
    assert lines[-1]["status"] == "succeeded" and lines[-1]["error"] is None
    assert lines[-1]["metrics"]["steps"] == 3


def test_adapter_learned_and_base_is_untouched(trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _ = trained_run
    adapter = run_dir / "adapter"
    assert (adapter / "tokenizer_config.json").is_file()
    assert all(t.abs().sum() > 0 for t in lora_b(adapter).values())  # B starts at zero: nonzero B was learned
    assert not any(".ref." in k for k in load_file(adapter / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    original = load_file(tiny_model_dir / "model.safetensors")
    loaded = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in model.named_parameters() if "lora_" not in n}  # fmt: skip
    for name, weight in original.items():
        assert torch.equal(weight, loaded[name].detach()), name


def test_config_metrics_and_before_after_files(trained_run):
    run_dir, _ = trained_run
    config = yaml.safe_load((run_dir / "run.yaml").read_text())  # the resolved config, defaults included
    assert config["learning_rate"] == 1e-3 and config["max_steps"] == 3 and config["beta"] == 0.1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "dpo" and metrics["reward_accuracy"] is not None
    assert metrics["learning_rate"] == pytest.approx(1e-3 * 2 / 3)  # 3 steps, full rate for 2: scaled by 2 / 3
    assert 0 < max(e["learning_rate"] for e in events(run_dir) if e["event"] == "progress") <= 1e-3 * 2 / 3
    assert (metrics["train_rows"], metrics["eval_rows"]) == (6, 2) and "eval_loss" in metrics
    panel = json.loads((run_dir / "before_after.json").read_text())
    assert panel == metrics["before_after"]
    assert len(panel["samples"]) == 2 and set(panel["samples"][0]) == {"prompt", "parent", "new"}
    assert FIRST_HELDOUT not in [s["prompt"] for s in panel["samples"]]  # trained on → not held out
    assert panel["kl_to_parent"] is not None and panel["parent_mean_words"] > 0


def test_continuing_starts_from_the_parent_adapter(trained_run, tiny_model_dir, tmp_path):
    parent_run, _ = trained_run
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(6))
    run_dir = tmp_path / "child"
    done = run_child("--data", str(data), "--out", str(run_dir), "--base-model", str(tiny_model_dir),
                     "--init-adapter", str(parent_run / "adapter"), "--max-steps", "1", "--learning-rate", "1e-5",
                     "--before-after-prompts", "0", *QUICK[:4])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    parent, child = lora_b(parent_run / "adapter"), lora_b(run_dir / "adapter")
    assert parent.keys() == child.keys()
    for name in parent:
        change = (child[name] - parent[name]).norm()
        assert 0 < change < 0.05 * parent[name].norm(), name  # moved a little, from the parent's weights
    first = next(e for e in events(run_dir) if e["event"] == "progress")
    assert first["reward_margin"] == pytest.approx(0, abs=1e-6)  # the reference is the parent itself
    assert json.loads((run_dir / "metrics.json").read_text())["reference"] == "parent adapter (frozen copy)"
    assert not (run_dir / "before_after.json").exists()  # --before-after-prompts 0 skips the panel


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--learning-rate", "-1"], "learning_rate: must be above 0"),
        (["--lora-r", "many"], "lora_r: expected int, got 'many'"),
        (["--loss-type", "magic"], "loss_type: 'magic' is not one of"),
        (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_exit_with_one_clear_line(tmp_path, args, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(2))
    done = run_child("--data", str(data), "--out", str(tmp_path / "run"), *args, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert events(tmp_path / "run")[-1]["status"] == "failed"  # the app sees why, too
    assert not (tmp_path / "run" / "adapter").exists()


def test_unknown_yaml_key_and_missing_data_are_refused(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "data": "x.jsonl", "learning_rat": 1e-4}))
    done = run_child("--config", str(run_yaml), timeout=120)
    assert done.returncode == 2 and "unknown key 'learning_rat'" in done.stderr
    done = run_child("--out", str(tmp_path / "run2"), timeout=120)
    assert done.returncode == 2 and "data: is required" in done.stderr
    done = run_child("--out", str(tmp_path / "run3"), "--data", str(tmp_path / "missing.jsonl"), timeout=120)
    assert done.returncode == 2 and "missing.jsonl does not exist" in done.stderr


def test_rows_without_rejected_fail_cleanly(tmp_path, tiny_model_dir):
    rows = pair_rows(3)
    del rows[1]["rejected"]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    done = run_child("--data", str(data), "--out", str(tmp_path / "run"), "--base-model", str(tiny_model_dir),
                     timeout=120)  # fmt: skip
    assert done.returncode == 1
    end = events(tmp_path / "run")[-1]
    assert end["status"] == "failed" and "row 2: missing or empty rejected" in end["error"]
    assert not (tmp_path / "run" / "adapter").exists()


def test_sigterm_stops_at_the_next_step_and_keeps_the_adapter(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "training", "dpo", "--data", str(data), "--out", str(run_dir), "--base-model",
           str(tiny_model_dir), "--max-steps", "2000", *QUICK]  # fmt: skip
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run_dir / "progress.jsonl").exists() or '"progress"' not in (run_dir / "progress.jsonl").read_text():
        assert child.poll() is None, child.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no progress line within 180 s"
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=120) == 0
    lines = events(run_dir)
    assert lines[-1]["event"] == "end" and lines[-1]["status"] == "cancelled"
    assert lines[-2]["step"] < 2000
    assert lora_b(run_dir / "adapter")  # what was done is saved
    assert not (run_dir / "before_after.json").exists()  # a cancelled run skips the panel


def test_parse_config_layers_defaults_yaml_and_flags(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(1))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"data: {data}\nout: {tmp_path}\nlearning_rate: 5e-4\nmax_steps: 3\ninit_adapter: null\n")
    cfg = parse_config(PrefDPOConfig, ["--config", str(run_yaml), "--max-steps", "7", "--gradient-checkpointing",
                                       "true"])  # fmt: skip
    assert (cfg.learning_rate, cfg.max_steps, cfg.gradient_checkpointing) == (5e-4, 7, True)  # "5e-4" is a str in YAML
    assert cfg.beta == PrefDPOConfig.beta and cfg.init_adapter is None
    with pytest.raises(ConfigError, match="lora_dropout: must be in"):
        parse_config(CommonConfig, ["--data", str(data), "--out", str(tmp_path), "--lora-dropout", "1"])
    with pytest.raises(ConfigError, match="gradient_checkpointing: expected bool"):
        parse_config(CommonConfig, ["--data", str(data), "--out", str(tmp_path), "--gradient-checkpointing", "maybe"])
    with pytest.raises(ConfigError, match="max_steps: expected int, got '1e400'"):  # int(inf): OverflowError
        parse_config(CommonConfig, ["--data", str(data), "--out", str(tmp_path), "--max-steps", "1e400"])


def test_heldout_prompts_skip_trained_ones():
    prompts = heldout_prompts(pair_rows(2), limit=3)
    assert len(prompts) == 3 and all(p[-1]["role"] == "user" for p in prompts)
    assert FIRST_HELDOUT not in [p[-1]["content"] for p in prompts]


def test_before_after_kl_is_zero_against_itself_and_positive_after_training(trained_run, tiny_model_dir):
    run_dir, _ = trained_run
    cfg = PrefDPOConfig(base_model=str(tiny_model_dir), before_after_max_new_tokens=12)
    prompts = heldout_prompts([], limit=3)
    same = before_after(cfg, run_dir / "adapter", run_dir / "adapter", prompts, seed=5)
    assert same["kl_to_parent"] == pytest.approx(0, abs=1e-4)
    assert [s["parent"] for s in same["samples"]] == [s["new"] for s in same["samples"]]  # same seed, same model
    against_base = before_after(cfg, run_dir / "adapter", None, prompts, seed=5)
    assert against_base["kl_to_parent"] > 0 and against_base["parent"] == "base"


def test_unknown_method_is_one_clear_line():
    done = subprocess.run([sys.executable, "-m", "training", "no_such"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown method 'no_such'" in done.stderr


def test_the_learning_rate_is_scaled_down_for_long_runs():
    from training.dpo import PrefDPOConfig, planned_steps, scaled_learning_rate

    cfg = PrefDPOConfig(data="pairs.parquet", out="run")  # defaults: lr 1e-3, batch 4, 3 epochs, 16 full-rate steps
    assert [planned_steps(cfg, rows) for rows in (15, 20, 21, 28, 200)] == [12, 15, 18, 21, 150]
    assert scaled_learning_rate(cfg, 20) == 1e-3  # up to 16 steps: the full rate
    assert scaled_learning_rate(cfg, 28) == pytest.approx(1e-3 * 16 / 21)  # 64 votes' worth of pairs
    assert scaled_learning_rate(cfg, 200) == pytest.approx(1e-3 * 16 / 150)
    assert scaled_learning_rate(PrefDPOConfig(data="p", out="r", full_rate_steps=0), 200) == 1e-3  # off
    assert scaled_learning_rate(PrefDPOConfig(data="p", out="r", max_steps=40), 3) == pytest.approx(1e-3 * 16 / 40)


@pytest.mark.parametrize("method", ["kto", "sft"])
def test_kto_and_sft_hold_out_eval_fraction_of_the_rows(tmp_path, tiny_model_dir, method):
    """--eval-fraction holds out whole prompts for KTO and SFT as for DPO (it used to be accepted and ignored)."""
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = []
    for i in range(8):
        prompt = [{"role": "user", "content": f"Tell me one fact about tea (#{i})."}]
        if method == "kto":  # two labelled answers per prompt: a prompt's rows stay on one side of the split
            rows += [{"prompt": prompt, "completion": answer("Tea has a long history."), "label": True},
                     {"prompt": prompt, "completion": answer("No."), "label": False}]  # fmt: skip
        else:
            rows.append({"prompt": prompt, "completion": answer("Tea has a long history.")})
    run_dir = tmp_path / "run"
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = ["--data", str(data), "--out", str(run_dir), "--base-model", str(tiny_model_dir), "--max-steps", "2",
            "--eval-fraction", "0.25", "--batch-size", "2", "--max-length", "64",
            "--before-after-prompts", "0"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "training", method, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = (12, 4) if method == "kto" else (6, 2)  # 2 of 8 prompts held out
    assert (metrics["train_rows"], metrics["eval_rows"]) == expected and metrics["eval_loss"] is not None
    assert [e for e in events(run_dir) if e["event"] == "eval"]  # the held-out loss was measured during the run

"""Edges of the training child on the tiny model: rows TRL drops at max_length, a finished run's folder, the LoRA
shape of a continued adapter, rows mixing text and chat, a bad label in the held-out split, and config values that
were cut or accepted silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see training/__main__.py

import pytest  # noqa: E402
import yaml  # noqa: E402

from training.configparse import ConfigError, build_parser, flag_names, parse_config  # noqa: E402
from training.data import DataError, split_rows  # noqa: E402
from training.dpo import PrefDPOConfig, check_pairs  # noqa: E402
from training.kto import check_labels  # noqa: E402
from training.parent_adapter import adopt_parent_lora  # noqa: E402
from training.reward import RewardModelConfig  # noqa: E402
from training.sft import check_completions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--batch-size", "2", "--max-length", "64", "--before-after-prompts", "0"]
LONG = "word " * 80  # well over 64 tokens on its own


def chat(text: str, role: str = "user") -> list[dict]:
    return [{"role": role, "content": text}]


def rows_for(method: str, n: int, long: tuple[int, ...] = ()) -> list[dict]:
    """n rows of a method's export shape on distinct prompts; the rows numbered in `long` have over-long prompts."""
    rows = []
    for i in range(n):
        prompt = chat((LONG if i in long else "") + f"Tell me one fact about tea (#{i}).")
        good, bad = chat("Happy to help! Tea has a long history.", "assistant"), chat("No.", "assistant")
        if method in ("dpo", "reward"):
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
        elif method == "kto":
            rows.append({"prompt": prompt, "completion": good if i % 2 else bad, "label": bool(i % 2)})
        else:
            rows.append({"prompt": prompt, "completion": good})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_child(method: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", method, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]


# ---- rows TRL drops at max_length --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kto"])
def test_rows_whose_prompt_fills_max_length_fail_the_run_clearly(tmp_path, tiny_model_dir, method):
    """TRL drops a row whose prompt alone fills max_length: with every row dropped DPO and SFT died on a raw
    "num_samples=0" traceback and KTO "succeeded" with 0 steps and an untrained adapter. The check is one function
    (training.data.kept_rows) that each method calls, which test_metrics_count_the_rows_that_trained shows for all
    three: one method here (a child run costs ~8 s)."""
    data = write_jsonl(tmp_path / "rows.jsonl", rows_for(method, 6, long=tuple(range(6))))
    run_dir = tmp_path / "run"
    done = run_child(method, "--data", str(data), "--out", str(run_dir), "--base-model", str(tiny_model_dir),
                     "--max-steps", "2", *QUICK)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    end = events(run_dir)[-1]
    assert end["status"] == "failed" and "all 6 training rows" in end["error"] and "max_length (64)" in end["error"]
    assert "start" not in [e["event"] for e in events(run_dir)] and not (run_dir / "adapter").exists()


@pytest.mark.parametrize("method", ["dpo", "kto", "sft"])
def test_metrics_count_the_rows_that_trained(tmp_path, tiny_model_dir, method):
    data = write_jsonl(tmp_path / "rows.jsonl", rows_for(method, 8, long=(1, 4)))
    run_dir = tmp_path / "run"
    done = run_child(method, "--data", str(data), "--out", str(run_dir), "--base-model", str(tiny_model_dir),
                     "--max-steps", "1", *QUICK)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["train_rows"], metrics["dropped_rows"], metrics["eval_rows"]) == (6, 2, 0)
    assert "note: 2 rows dropped" in done.stdout


def test_max_length_help_says_what_happens():
    text = " ".join(build_parser(PrefDPOConfig).format_help().split())
    assert "the answer's end is cut off" in text and "alone has max_length tokens or more is dropped" in text


# ---- a finished run's folder, and repeating a run ------------------------------------------------------------
@pytest.fixture(scope="module")
def parent_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A real finished 1-step DPO run with a LoRA shape other than the defaults (r 4, alpha 8, q/v only)."""
    work = tmp_path_factory.mktemp("parent")
    data = write_jsonl(work / "pairs.jsonl", rows_for("dpo", 4))
    run_dir = work / "run"
    done = run_child("dpo", "--data", str(data), "--out", str(run_dir), "--base-model", str(tiny_model_dir),
                     "--max-steps", "1", "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules",
                     "q_proj,v_proj", *QUICK)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_folder_is_refused_untouched(parent_run, tmp_path, tiny_model_dir):
    """`--config RUN_DIR/run.yaml` (the documented repeat) reused `out: RUN_DIR`: it overwrote the registered
    version's adapter and appended to its progress.jsonl."""
    before = snapshot(parent_run)
    done = run_child("dpo", "--config", str(parent_run / "run.yaml"), timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"out: {parent_run} holds the end line of a run" in done.stderr and "--out NEW_DIR" in done.stderr
    done = run_child("dpo", "--config", str(parent_run / "run.yaml"), "--max-steps", "0", timeout=120)
    assert done.returncode == 2 and "max_steps: must be -1 or ≥ 1" in done.stderr  # a config error as well
    assert snapshot(parent_run) == before  # no end line appended, no file rewritten
    with_adapter_only = tmp_path / "copied"
    (with_adapter_only / "adapter").mkdir(parents=True)
    done = run_child("dpo", "--config", str(parent_run / "run.yaml"), "--out", str(with_adapter_only), timeout=120)
    assert done.returncode == 2 and "holds a trained adapter/" in done.stderr
    assert [p.name for p in with_adapter_only.iterdir()] == ["adapter"]
    again = tmp_path / "again"
    done = run_child("dpo", "--config", str(parent_run / "run.yaml"), "--out", str(again))  # the repeat as documented
    assert done.returncode == 0, done.stderr[-2000:]
    assert (again / "adapter" / "adapter_config.json").is_file() and events(again)[-1]["status"] == "succeeded"
    assert yaml.safe_load((again / "run.yaml").read_text())["lora_r"] == 4
    assert snapshot(parent_run) == before


# ---- the LoRA shape of a continued adapter -------------------------------------------------------------------
def test_a_continued_run_records_the_parent_lora_shape(parent_run, tmp_path, tiny_model_dir):
    """With --init-adapter the requested lora_* values were ignored while run.yaml recorded them."""
    settings = tmp_path / "settings.yaml"  # as the runner writes the Train tab's settings
    settings.write_text(yaml.safe_dump({"lora_r": 16, "lora_alpha": 32, "lora_target_modules": "all-linear"}))
    data = write_jsonl(tmp_path / "pairs.jsonl", rows_for("dpo", 4))
    run_dir = tmp_path / "child"
    done = run_child("dpo", "--config", str(settings), "--data", str(data), "--out", str(run_dir), "--base-model",
                     str(tiny_model_dir), "--init-adapter", str(parent_run / "adapter"), "--max-steps", "1",
                     *QUICK)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert (recorded["lora_r"], recorded["lora_alpha"], recorded["lora_target_modules"]) == (4, 8, "q_proj,v_proj")
    assert "note: lora_r 16 is not used" in done.stdout
    trained = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (trained["r"], trained["lora_alpha"]) == (4, 8)  # what really trained


def test_a_lora_flag_that_differs_from_the_parent_is_refused(parent_run, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows_for("dpo", 4))
    common = ["--data", str(data), "--out", str(tmp_path / "out"), "--init-adapter", str(parent_run / "adapter")]

    def adopted(cls, argv):
        cfg = parse_config(cls, argv)
        return cfg, adopt_parent_lora(cfg, flag_names(cls, argv))

    with pytest.raises(ConfigError, match="--lora-r 16 differs from the parent adapter's 4"):
        adopted(PrefDPOConfig, [*common, "--lora-r", "16"])
    with pytest.raises(ConfigError, match="--lora-target-modules all-linear differs"):
        adopted(PrefDPOConfig, [*common, "--lora-target-modules", "all-linear"])
    cfg, notes = adopted(PrefDPOConfig, [*common, "--lora-r", "4", "--lora-target-modules", "v_proj,q_proj"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules) == (4, 8, "q_proj,v_proj") and len(notes) == 1
    cfg, notes = adopted(RewardModelConfig, [*common, "--lora-r", "16"])  # a reward model starts from the base
    assert (cfg.lora_r, notes) == (16, [])
    done = run_child("dpo", *common, "--lora-alpha", "64", timeout=120)
    assert done.returncode == 2 and "--lora-alpha 64 differs from the parent adapter's 8" in done.stderr


# ---- row shapes ----------------------------------------------------------------------------------------------
def test_a_row_mixing_chat_and_text_is_named():
    """A chat prompt with plain-text answers (or the reverse) in one row was a raw TypeError inside TRL."""
    pairs = rows_for("dpo", 3)
    pairs[1] = {**pairs[1], "chosen": "plain", "rejected": "text"}
    with pytest.raises(DataError, match=r"p\.jsonl, row 2: mixes plain text \(chosen, rejected\) with chat"):
        check_pairs(pairs, "p.jsonl")
    every = [{"prompt": "q", "chosen": chat("a", "assistant"), "rejected": chat("b", "assistant")}] * 3
    with pytest.raises(DataError, match=r"row 1: mixes plain text \(prompt\) with chat messages \(chosen, rejected"):
        check_pairs(every, "p.jsonl")
    labelled = rows_for("kto", 4)
    labelled[2] = {**labelled[2], "completion": "plain"}
    with pytest.raises(DataError, match=r"k\.jsonl, row 3: mixes plain text \(completion\)"):
        check_labels(labelled, "k.jsonl")
    completions = rows_for("sft", 2) + [{"prompt": "q", "completion": "a"}]
    with pytest.raises(DataError, match=r"s\.jsonl, row 3: text where row 1 is chat"):
        check_completions(completions, "s.jsonl")
    with pytest.raises(DataError, match=r"row 1: completion must be text or a list of chat messages"):
        check_completions([{"prompt": "q", "completion": {"text": "a"}}], "s.jsonl")
    check_completions([{"prompt": "q", "completion": "a"}] * 2, "s.jsonl")  # text rows stay fine


def test_a_bad_label_in_the_held_out_rows_fails_before_training(tmp_path, tiny_model_dir):
    """Labels were checked on the training rows only: a bad one held out crashed after training."""
    rows = rows_for("kto", 8)
    del rows[7]["label"]
    _, held = split_rows(rows, 0.25, seed=6)
    assert rows[7] in held  # the case of the finding: the bad row is in the held-out split
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    run_dir = tmp_path / "run"
    done = run_child("kto", "--data", str(data), "--out", str(run_dir), "--base-model", str(tiny_model_dir),
                     "--eval-fraction", "0.25", "--seed", "6", "--max-steps", "1", *QUICK)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "row 8: missing or empty label (true or false)" in events(run_dir)[-1]["error"]
    assert [e["event"] for e in events(run_dir)] == ["end"]


# ---- config values -------------------------------------------------------------------------------------------
def test_fractions_of_whole_numbers_are_refused_alike(tmp_path):
    """`--max-steps 1.5e0` or `lora_r: "8.9e0"` were cut to 1 and 8 while "2.0" was refused."""
    data = write_jsonl(tmp_path / "pairs.jsonl", rows_for("dpo", 1))
    common = ["--data", str(data), "--out", str(tmp_path / "out")]
    for flag, value in (("--max-steps", "1.5e0"), ("--lora-r", "8.9e0"), ("--batch-size", "2.5")):
        with pytest.raises(ConfigError, match=f"expected a whole number, got '{value}'"):
            parse_config(PrefDPOConfig, [*common, flag, value])
    config = tmp_path / "c.yaml"
    config.write_text("lora_r: 3.5\n")
    with pytest.raises(ConfigError, match="lora_r: expected a whole number, got 3.5"):
        parse_config(PrefDPOConfig, [*common, "--config", str(config)])
    cfg = parse_config(PrefDPOConfig, [*common, "--max-steps", "2.0", "--lora-r", "1e1", "--seed", " 7 "])
    assert (cfg.max_steps, cfg.lora_r, cfg.seed) == (2, 10, 7)
    with pytest.raises(ConfigError, match=r"warmup_steps: a step count \(≥ 1\) is a whole number.*got 1.5"):
        parse_config(PrefDPOConfig, [*common, "--warmup-steps", "1.5"])
    assert parse_config(PrefDPOConfig, [*common, "--warmup-steps", "0.5"]).warmup_steps == 0.5  # a fraction of all
    assert parse_config(PrefDPOConfig, [*common, "--warmup-steps", "3"]).warmup_steps == 3


def test_label_smoothing_only_with_the_loss_that_uses_it(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows_for("dpo", 1))
    common = ["--data", str(data), "--out", str(tmp_path / "out"), "--label-smoothing", "0.1"]
    with pytest.raises(ConfigError, match="label_smoothing: only the 'robust' loss uses it; loss_type 'sigmoid'"):
        parse_config(PrefDPOConfig, common)
    assert parse_config(PrefDPOConfig, [*common, "--loss-type", "robust"]).label_smoothing == 0.1


def test_a_missing_base_model_is_refused_before_the_data_is_read(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows_for("dpo", 4))
    done = run_child("dpo", "--data", str(data), "--out", str(tmp_path / "run"), "--base-model", "/nonexistent",
                     timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "base_model: folder /nonexistent does not exist" in done.stderr
    common = ["--data", str(data), "--out", str(tmp_path / "out")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no config.json"):
        parse_config(PrefDPOConfig, [*common, "--base-model", str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="is neither 'bundled', a folder nor a hub id"):
        parse_config(PrefDPOConfig, [*common, "--base-model", "not a model"])
    assert parse_config(PrefDPOConfig, [*common, "--base-model", "HuggingFaceTB/SmolLM2-135M"]).base_model

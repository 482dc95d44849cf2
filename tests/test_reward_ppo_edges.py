"""Reward model and PPO edges: the held-out split by prompt, score files, a Cancel while the reward model scores,
the reward model a PPO run is given (its version, its base model) and PPO's unused settings."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from storage.db import Store
from tests.datahelpers import seed_preferences
from tests.test_training_reward import run_in_process, write_jsonl

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def random_reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    """A saved one-output classifier on the tiny Llama (random head: the tests need a reward model, not a good one)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from training.reward import use_distinct_pad_token

    out = tmp_path_factory.mktemp("random-reward") / "reward_model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    use_distinct_pad_token(tokenizer)
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---- 1: the reward model's held-out split keeps a prompt's rows together ------------------------------
def reward_export_rows(n_prompts: int) -> list[dict]:
    """The reward export for edited answers: winner over loser, the edit over each original (shared answers)."""
    rows = []
    for i in range(n_prompts):
        prompt = [{"role": "user", "content": f"q{i}"}]
        a, b, edit = f"a{i}", f"b{i}", f"edit{i}"
        rows += [{"prompt": prompt, "chosen": a, "rejected": b}, {"prompt": prompt, "chosen": edit, "rejected": a},
                 {"prompt": prompt, "chosen": edit, "rejected": b}]  # fmt: skip
    return rows


@pytest.mark.parametrize("seed", [42, 1, 7])
def test_reward_split_holds_out_whole_prompts(seed):
    from training.reward import split_pairs

    train, held = split_pairs(reward_export_rows(10), "x", 0.1, seed)
    prompt = lambda pair: pair[0][0]["content"]  # noqa: E731
    assert len(held) == 3 and len(train) == 27  # one prompt's three rows (the split of tuples held out single rows)
    assert not {prompt(p) for p in held} & {prompt(p) for p in train}
    assert all(isinstance(p, tuple) and p[1][0]["role"] == "assistant" for p in train + held)


# ---- 2, 3: score files ---------------------------------------------------------------------------------
def test_parquet_output_keeps_the_columns_of_every_row(tmp_path):
    import pyarrow.parquet as pq

    from training.score import write_rows

    rows = [{"prompt": "p", "answer": "a", "score": 0.5},
            {"prompt": "q", "answer": "b", "score": 1.5, "generation_id": 7, "note": "x"}]  # fmt: skip
    write_rows(rows, tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert table == [{**rows[0], "generation_id": None, "note": None}, rows[1]]


def test_score_cli_averages_only_the_scores_it_computed(tmp_path, random_reward_model, capsys):
    """A passed-through "score" (null here, or another model's) is neither averaged nor a TypeError."""
    from training import score

    data = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "p", "chosen": "good", "rejected": "bad", "score": None},
        {"prompt": "q", "chosen": "yes", "rejected": "no", "score": 1000.0},
    ])  # fmt: skip
    out = tmp_path / "out.jsonl"
    argv = ["--reward-model", str(random_reward_model), "--data", str(data), "--out", str(out)]
    assert score.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    computed = [r[k] for r in rows for k in ("chosen_score", "rejected_score")]
    assert [r["score"] for r in rows] == [None, 1000.0]  # passed through unchanged
    printed = capsys.readouterr().out
    assert "scored 4 answers in 2 rows" in printed and f"(mean {sum(computed) / 4:.3f})" in printed


# ---- 4: a Cancel while the finished reward model scores the stored answers -----------------------------
def test_cancel_while_scoring_keeps_the_saved_reward_model(tmp_path, tiny_model_dir):
    """SIGTERM after the first "scoring" line: the run ends succeeded with a note (the model was saved before)."""
    from tests.test_training_reward import toy_reward_rows
    from training import reward

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_reward_rows(8))
    answers = [{"generation_id": i, "prompt": f"Question {i}?", "answer": "An answer. " * 20} for i in range(6000)]
    generations = write_jsonl(tmp_path / "generations.jsonl", answers)
    run_dir = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(run_dir), "--base-model", str(tiny_model_dir), "--max-steps", "1",
            "--batch-size", "2", "--max-length", "64", "--score-data", str(generations)]  # fmt: skip
    progress, sent = run_dir / "progress.jsonl", threading.Event()

    def cancel_when_scoring():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not sent.is_set():
            if progress.is_file() and '"event": "scoring"' in progress.read_text():
                os.kill(os.getpid(), signal.SIGTERM)  # run_method's handler: the child's Cancel
                sent.set()
            time.sleep(0.02)

    original = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a SIGTERM after the run: harmless
    try:
        watcher = threading.Thread(target=cancel_when_scoring, daemon=True)
        watcher.start()
        assert run_in_process(reward.main, argv) == 0
        sent.set()  # the watcher stops (when it sent nothing, the assertion below says so)
        watcher.join()
    finally:
        signal.signal(signal.SIGTERM, original)
    assert '"status": "cancelled"' not in progress.read_text()
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    end = events[-1]
    assert end["event"] == "end" and end["status"] == "succeeded", end
    assert end["metrics"]["cancelled_after_saving"] is True and "cancelled" in end["metrics"]["note"]
    assert end["metrics"]["scored_generations"] == 0 and not (run_dir / "scores.jsonl").exists()
    assert (run_dir / "reward_model" / "config.json").is_file()
    assert 0 < [e for e in events if e["event"] == "scoring"][-1]["done"] < len(answers)  # else: use more rows


def test_an_error_while_scoring_is_a_note_not_a_failed_run(tmp_path, random_reward_model):
    from training.reward import RewardModelConfig, score_stored_generations

    out = tmp_path / "run"
    (out / "reward_model").parent.mkdir()
    os.symlink(random_reward_model, out / "reward_model")
    bad = write_jsonl(tmp_path / "generations.jsonl", [{"generation_id": 1, "prompt": "p", "answer": 5}])
    cfg = RewardModelConfig(data=str(bad), out=str(out), score_data=str(bad))
    result = score_stored_generations(cfg, threading.Event())
    assert result["scored_generations"] == 0 and "scoring the stored answers failed" in result["note"]
    assert "cancelled_after_saving" not in result


def test_a_reward_run_cancelled_while_scoring_is_registered_without_its_chained_ppo(tmp_path):
    from training.registry import reward_outcome

    store = Store(tmp_path / "store.duckdb")
    try:
        version = store.add_version(kind="reward", base_model="tiny", adapter_path=str(tmp_path / "rm"))
        chain = {"method": "ppo", "settings": {"total_episodes": 4}, "parent_version": 0}
        row = {"run_dir": str(tmp_path), "config": json.dumps({"chain": chain})}
        cancelled = {"cancelled_after_saving": True, "note": "scoring the stored answers was cancelled"}
        note, follow = reward_outcome(store, version, row, cancelled)
        assert follow is None and "chained PPO run was not started" in note
        note, follow = reward_outcome(store, version, row, {"scored_generations": 3})
        assert note is None and follow["settings"] == {"total_episodes": 4, "reward_model_version": version}
    finally:
        store.close()


# ---- 5, 6: the reward model a PPO run gets, and its unused settings ------------------------------------
def test_ppo_gets_a_reward_version_of_the_same_base_and_records_it(tmp_path, tiny_model_dir, random_reward_model):
    from training.runner import JobRunner, RunRejected
    from ui.train_settings import parse_settings, submit

    store = Store(tmp_path / "store.duckdb")
    try:
        seed_preferences(store, 6)
        other = store.add_version(kind="reward", base_model="some-other/base-model", adapter_path="/elsewhere/rm")
        mine = store.add_version(kind="reward", base_model=str(tiny_model_dir), adapter_path=str(random_reward_model))
        runner = JobRunner(store, runs_dir=tmp_path / "runs", base_model=str(tiny_model_dir),
                           model_cache=tmp_path / "cache")  # fmt: skip
        with pytest.raises(RunRejected, match="trained on some-other/base-model, not on this app's base model"):
            runner.submit("ppo", {"reward_model_version": other})
        with pytest.raises(RunRejected, match="trained on some-other/base-model"):
            runner.submit("ppo", {"reward_model": "/elsewhere/rm"})  # the path form finds the version too
        with pytest.raises(RunRejected, match="epochs: PPO does not use it"):
            runner.submit("ppo", {"reward_model_version": mine, "epochs": 3})
        form = {"reward_model": str(random_reward_model), "epochs": "7", "max_steps": "1",
                "batch_size": "2", "max_length": "64", "response_length": "4"}  # fmt: skip
        run_id = submit(runner, "ppo", parse_settings(form), 0)  # the Train tab's PPO: the dropdown's pick, Epochs
        config = yaml.safe_load((Path(runner.status(run_id).run_dir) / "run.yaml").read_text())
        assert config["reward_model_version"] == mine and config["reward_model"] == str(random_reward_model)
        assert "epochs" not in config
        queued = runner.submit("ppo", {"reward_model": str(random_reward_model)})  # the path form: same version
        assert runner.status(queued).config["reward_model_version"] == mine
        runner.cancel(queued)
        status = runner.wait(run_id, timeout=300)
        assert status.status == "succeeded", status.error
        assert store.get_version(status.result_version)["reward_model_id"] == mine
        assert status.metrics["reward_model_version"] == mine
        assert status.metrics["prompts"] == 2  # max_steps 1 × batch 2 episodes: 2 of the 6 prompts answered
    finally:
        store.close()


def test_the_train_tab_shows_how_far_the_scoring_is():
    from training.runner import RunStatus
    from ui.train_tab import _progress_html

    events = [{"event": "progress", "step": 8, "total": 8, "eta": 0.0}, {"event": "scoring", "done": 64, "total": 900}]
    status = RunStatus(id=3, method="reward", status="running", run_dir="", config={}, metrics={}, error=None,
                       result_version=None, parent_version=0, snapshot_rows=9, progress=events)  # fmt: skip
    shown = _progress_html(status)
    assert "scoring the stored answers: 64/900" in shown and "ETA 0 s" not in shown

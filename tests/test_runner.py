"""The job runner the UI uses: real child processes, real TRL, real DuckDB rows."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from storage.db import Store
from tests.datahelpers import QUICK_RUN, seed_preferences
from training.runner import JobRunner, RunRejected, read_progress


@pytest.fixture()
def store(db_url):
    store = Store(db_url)
    yield store
    store.close()


def runner_for(store, tmp_path, model_dir) -> JobRunner:
    return JobRunner(store, runs_dir=tmp_path / "runs", base_model=str(model_dir), model_cache=tmp_path / "cache")


def run_rows(store) -> list[tuple]:
    with store.read() as cur:
        return cur.execute("SELECT id, status FROM training_runs ORDER BY id").fetchall()


def test_validation_refuses_and_launches_nothing(store, tmp_path, tiny_model_dir):
    runner = runner_for(store, tmp_path, tiny_model_dir)
    seed_preferences(store, 2)
    with pytest.raises(RunRejected, match="only 2 usable preference pairs"):
        runner.submit("dpo", QUICK_RUN)
    seed_preferences(store, 10)
    with pytest.raises(RunRejected, match="learning rate must be a number above 0"):
        runner.submit("dpo", {**QUICK_RUN, "learning_rate": -1})
    with pytest.raises(RunRejected, match="far too high"):
        runner.submit("dpo", {**QUICK_RUN, "learning_rate": 5.0})
    with pytest.raises(RunRejected, match="no reward model"):
        runner.submit("ppo", QUICK_RUN)
    with pytest.raises(RunRejected, match="version 7 does not exist"):
        runner.submit("dpo", QUICK_RUN, parent_version=7)
    # What only the child's dataclass knew: refused here now, before a snapshot, a queue entry or a first stage.
    with pytest.raises(RunRejected, match="learning rate must be a number above 0 \\(got nan\\)"):
        runner.submit("dpo", {**QUICK_RUN, "learning_rate": float("nan")})
    with pytest.raises(RunRejected, match="dpo: max_length: must be ≥ 16 tokens"):
        runner.submit("dpo", {**QUICK_RUN, "max_length": 8})
    with pytest.raises(RunRejected, match="kto: batch_size: KTO's KL estimate needs at least 2 rows"):
        runner.submit("kto", {**QUICK_RUN, "batch_size": 1})
    with pytest.raises(RunRejected, match="unknown key 'learnig_rate'"):
        runner.submit("dpo", {**QUICK_RUN, "learnig_rate": 1e-4})
    with pytest.raises(RunRejected, match="ppo: total_episodes: must be ≥ 1"):  # before the reward model trains
        runner.submit_chain(QUICK_RUN, {"total_episodes": 0})
    assert run_rows(store) == [] and not list((tmp_path / "runs").glob("run-*"))


def test_failing_child_is_marked_failed_with_its_log(store, tmp_path, tiny_model_dir):
    runner = runner_for(store, tmp_path, tiny_model_dir)
    seed_preferences(store, 8)
    run_id = runner.submit("dpo", {**QUICK_RUN, "lora_target_modules": "no_such_module"})
    status = runner.wait(run_id, timeout=300)
    assert status.status == "failed"
    assert "no_such_module" in status.error  # the log tail names the cause
    assert status.result_version is None


def test_cancel_stops_a_running_child(store, tmp_path, tiny_model_dir):
    runner = runner_for(store, tmp_path, tiny_model_dir)
    seed_preferences(store, 16)
    run_id = runner.submit("dpo", {**QUICK_RUN, "max_steps": 2000})
    deadline = time.monotonic() + 180
    while not any(e.get("event") == "progress" for e in read_progress(runner.status(run_id).run_dir)):
        assert time.monotonic() < deadline, "no progress line within 180 s"
        runner.tick()
        time.sleep(0.2)
    assert runner.cancel(run_id) == "stopping at the next step"
    status = runner.wait(run_id, timeout=120)
    assert status.status == "cancelled"
    assert status.last["step"] < 2000
    run_dir = Path(status.run_dir)
    resolved = yaml.safe_load((run_dir / "run.yaml").read_text())  # the runner's settings, rewritten by the child
    assert resolved["max_steps"] == 2000 and resolved["beta"] == 0.1  # beta: a default the runner did not send
    assert not (run_dir / "config.yaml").exists()


def test_restart_marks_orphans_failed_and_keeps_the_queue(store, tmp_path, tiny_model_dir):
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO training_runs (id, method, status, pid, run_dir, created_at) "
            "VALUES (nextval('training_runs_id_seq'), 'dpo', 'running', 999999, ?, now())",
            [str(tmp_path / "gone")],
        )
    runner = runner_for(store, tmp_path, tiny_model_dir)  # a fresh app start
    assert run_rows(store)[0][1] == "failed"
    with store.read() as cur:
        assert "stopped while this run was running" in cur.execute("SELECT error FROM training_runs").fetchone()[0]
    runner.stop()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["duckdb"], indirect=True)  # the runner on PostgreSQL: the tiny-model tests
def test_dpo_on_the_bundled_model_end_to_end(store, tmp_path, bundled_model_dir):
    """~40 comparisons → a real DPO run through the runner → a version that changes what the engine says."""
    from generation.engine import GenerationEngine
    from generation.sampling import SamplingParams

    trained_on = seed_preferences(store, 40)
    runner = JobRunner(store, runs_dir=tmp_path / "runs", base_model="bundled", model_cache=bundled_model_dir.parent)
    settings = {"max_steps": 3, "batch_size": 4, "max_length": 96, "learning_rate": 1e-3}
    # A one-prompt before/after panel (the default's 4 prompts x 128 tokens took ~55 s here; the panel's own tests
    # are in test_training_dpo.py); the run must still write it.
    run_id = runner.submit("dpo", {**settings, "before_after_prompts": 1, "before_after_max_new_tokens": 16})
    status = runner.wait(run_id, timeout=600)
    assert status.status == "succeeded", status.error
    assert [e["event"] for e in status.progress][0] == "start" and status.progress[-1]["event"] == "end"

    adapter = Path(status.run_dir) / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: any nonzero B is learned

    base_before = load_file(bundled_model_dir / "model.safetensors")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundled_model_dir), str(adapter))
    base_after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                  for n, p in model.named_parameters() if "lora_" not in n}  # fmt: skip
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.5.mlp.down_proj.weight"):
        assert torch.equal(base_before[name], base_after[name].detach()), name

    version = store.get_version(status.result_version)
    assert version["parent_id"] == 0 and version["run_id"] == run_id
    assert sorted(json.loads(version["trained_on"]) if isinstance(version["trained_on"], str)
                  else version["trained_on"]) == sorted(trained_on)  # fmt: skip
    with store.read() as cur:
        assert cur.execute("SELECT status FROM training_runs WHERE id = ?", [run_id]).fetchone()[0] == "succeeded"

    engine = GenerationEngine("bundled", cache_dir=bundled_model_dir.parent)
    try:
        messages = [{"role": "user", "content": "Tell me one fact about tea."}]
        params = SamplingParams(temperature=0.7, max_new_tokens=24, seed=7)
        before = engine.submit(messages, params, version=0).result(timeout=120).text
        engine.load_version(status.result_version, str(adapter))
        engine.set_active(status.result_version)
        after = engine.submit(messages, params, version=status.result_version).result(timeout=120).text
        again = engine.submit(messages, params, version=0).result(timeout=120).text
    finally:
        engine.close()
    assert before == again  # same seed, same version → same text
    assert after != before  # the new version answers differently
    assert os.path.isdir(status.run_dir)
    assert len(json.loads((Path(status.run_dir) / "before_after.json").read_text())["samples"]) == 1


def test_a_run_cancelled_as_it_starts_is_cancelled_not_failed(store, tmp_path, tiny_model_dir):
    """SIGTERM before the child has set up its handler (its first fraction of a second) kills it without an end
    line: the run read "failed: exited with code -15"."""
    runner = runner_for(store, tmp_path, tiny_model_dir)
    seed_preferences(store, 8)
    run_id = runner.submit("dpo", QUICK_RUN)  # the child starts within submit
    assert runner.cancel(run_id) == "stopping at the next step"
    ended = runner.wait(run_id, timeout=120)
    assert ended.status == "cancelled" and not store.list_versions()[1:]
    runner.stop()


def test_a_run_is_registered_once_however_often_it_is_recorded(store, tmp_path):
    """Recording a run's end again (the first recording could not mark the run ended) registered a second version."""
    from training.registry import register_version

    row = {"id": 7, "run_dir": str(tmp_path), "config": "{}", "method": "dpo", "parent_version": 0}
    first = register_version(store, "bundled", row, {"loss": 0.5})
    assert register_version(store, "bundled", row, {"loss": 0.5}) == first
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM model_versions WHERE run_id = 7").fetchone()[0] == 1


def test_a_version_keeps_the_base_model_its_run_trained_on(store, tmp_path):
    """A run that ends around a restart with another --model is recorded by a runner on that other model: the
    version must name the base it was trained on, or its adapter is later loaded onto the wrong base."""
    from training.registry import register_version

    row = {"id": 8, "run_dir": str(tmp_path), "config": json.dumps({"config": {"base_model": "model-a"}}),
           "method": "dpo", "parent_version": 0}  # fmt: skip
    version = register_version(store, "model-b", row, {})
    assert store.get_version(version)["base_model"] == "model-a"


def test_a_run_cancelled_while_the_queue_starts_it_never_starts(store, tmp_path, tiny_model_dir):
    """Two app processes on PostgreSQL: one cancels a queued run while the other, which runs the queue, is starting
    it. The start claimed nothing and overwrote 'cancelled' with 'running'; now it only starts a run still queued."""
    runner = runner_for(store, tmp_path, tiny_model_dir)
    runner.stop()  # a stopping runner's tick() starts nothing: the run stays queued
    seed_preferences(store, 8)
    run_id = runner.submit("dpo", QUICK_RUN)
    row = runner._rows("id = ?", [run_id])[0]  # what the queue read before starting it
    assert row["status"] == "queued"
    with store.transaction() as cur:  # the other process's Cancel lands first
        cur.execute("UPDATE training_runs SET status = 'cancelled' WHERE id = ?", [run_id])
    assert runner._launch(row) is False and run_id not in runner._children
    assert runner.status(run_id).status == "cancelled"


def test_a_reward_run_whose_scores_cannot_be_saved_still_succeeds(store, tmp_path):
    """The reward model is registered before its score file is read: a bad score file used to mark the run failed
    while its version stayed registered."""
    runner = JobRunner(store, runs_dir=tmp_path / "runs", base_model="tiny")
    run_id = runner._insert_run("reward", 0, 10)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "scores.jsonl").write_text("not json\n")
    runner._set(run_id, run_dir=str(run_dir), config="{}")
    runner._finish(runner._rows("id = ?", [run_id])[0], {"status": "succeeded", "metrics": {"steps": 3}}, 0)
    status = runner.status(run_id)
    assert status.status == "succeeded" and status.result_version is not None
    assert "scores of the stored answers were not saved" in status.error


def test_runs_from_another_folder_on_top_of_no_foreign_version_in_a_fresh_folder(
    store, tmp_path, tiny_model_dir, monkeypatch
):
    """A run started by an app launched from another folder (`python /path/app.py`) found no `training` package;
    a run folder left by an earlier database with the same ids was reused (its old end line decided the new run);
    training on top of a version of another base model was accepted."""
    runner = runner_for(store, tmp_path, tiny_model_dir)
    seed_preferences(store, 8)
    foreign = store.add_version(base_model="another-model", adapter_path=str(tmp_path / "foreign"), parent_id=0)
    with pytest.raises(RunRejected, match="trained on another-model"):
        runner.submit("dpo", QUICK_RUN, parent_version=foreign)
    stale = tmp_path / "runs" / "run-0001-dpo"
    stale.mkdir(parents=True)
    (stale / "progress.jsonl").write_text('{"event": "end", "status": "succeeded", "metrics": {"old": true}}\n')
    monkeypatch.chdir(tmp_path)  # not the checkout
    run_id = runner.submit("dpo", QUICK_RUN)
    status = runner.wait(run_id, timeout=300)
    assert status.status == "succeeded", status.error
    assert status.run_dir != str(stale) and "old" not in status.metrics


def test_a_run_another_process_is_still_preparing_is_not_failed(pg_server, tmp_path, tiny_model_dir):
    """On PostgreSQL the queue's owner polled a run another app process had queued but not yet written the folder
    of, and failed it ("its run folder was never completed") while the other process said it had started."""
    url = pg_server.new_database()
    owner_store, other_store = Store(url), Store(url)
    try:
        owner = runner_for(owner_store, tmp_path / "a", tiny_model_dir)
        other = runner_for(other_store, tmp_path / "b", tiny_model_dir)
        run_id = other._insert_run("dpo", 0, 8)  # queued; its folder is being written
        owner.tick()
        assert run_rows(owner_store) == [(run_id, "queued")]
    finally:
        owner_store.close()
        other_store.close()


def test_a_run_that_took_no_optimizer_step_is_failed_and_registers_nothing(tmp_path):
    """A KTO run whose rows TRL all dropped "succeeded" with 0 steps, and its untrained adapter became a candidate."""
    store = Store(tmp_path / "steps.duckdb")
    runner = JobRunner(store, runs_dir=tmp_path / "runs", base_model="tiny")
    for method, metrics in (("kto", {"steps": 0, "train_rows": 12}), ("ppo", {"updates": 0})):
        run_id = runner._insert_run(method, 0, 12)
        run_dir = tmp_path / f"run-{method}"
        run_dir.mkdir()
        runner._set(run_id, run_dir=str(run_dir), config="{}")
        runner._finish(runner._rows("id = ?", [run_id])[0], {"status": "succeeded", "metrics": metrics}, 0)
        status = runner.status(run_id)
        assert (status.status, status.result_version) == ("failed", None)
        assert status.error.startswith("the run took no optimizer step: nothing was trained")
    assert store.list_versions()[1:] == []
    store.close()


def test_a_kto_run_whose_prompts_fill_max_length_fails_clearly(tmp_path, tiny_model_dir):
    store = Store(tmp_path / "long.duckdb")
    for i in range(6):
        prompt = store.add_prompt([{"role": "user", "content": "word " * 100 + f"question {i}?"}], "test")
        a = store.add_generation(prompt, f"good {i}", model_version_id=0)
        b = store.add_generation(prompt, f"bad {i}", model_version_id=0)
        store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="t",
                             choice="A" if i % 3 else "both_bad", source="test")  # fmt: skip
    runner = runner_for(store, tmp_path, tiny_model_dir)
    status = runner.wait(runner.submit("kto", {**QUICK_RUN, "before_after_prompts": 0}), timeout=300)
    assert (status.status, status.result_version) == ("failed", None)
    assert "all 12 training rows have a prompt of max_length (64) tokens or more" in status.error
    assert store.list_versions()[1:] == []
    runner.stop()
    store.close()


def test_a_run_continuing_the_serving_version_records_its_lora_shape(tmp_path, tiny_model_dir):
    """The Train tab's LoRA settings go into run.yaml also when the run continues from the serving version's
    adapter, where they cannot apply: the run records (and trains with) the parent's shape."""
    store = Store(tmp_path / "continue.duckdb")
    seed_preferences(store, 6)
    runner = runner_for(store, tmp_path, tiny_model_dir)
    settings = {**QUICK_RUN, "before_after_prompts": 0}
    first = runner.wait(runner.submit("dpo", {**settings, "lora_r": 4, "lora_alpha": 8}), timeout=300)
    assert first.status == "succeeded", first.error
    second = runner.submit("dpo", {**settings, "lora_r": 16, "lora_alpha": 32}, parent_version=first.result_version)
    status = runner.wait(second, timeout=300)
    assert status.status == "succeeded", status.error
    recorded = yaml.safe_load((Path(status.run_dir) / "run.yaml").read_text())
    assert (recorded["lora_r"], recorded["lora_alpha"], recorded["init_adapter"]) == (4, 8, first.run_dir + "/adapter")
    adapter = json.loads((Path(status.run_dir) / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    runner.stop()
    store.close()

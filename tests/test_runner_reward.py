"""Reward model through the app's runner: registered as a reward version, every stored generation scored."""

from __future__ import annotations

from storage.db import Store
from storage.scores import comparison_scores
from tests.datahelpers import QUICK_RUN, seed_preferences
from training.runner import JobRunner


def test_reward_run_registers_a_reward_model_and_scores_stored_generations(tmp_path, tiny_model_dir):
    store = Store(tmp_path / "reward.duckdb")
    try:
        comparisons = seed_preferences(store, 8)
        runner = JobRunner(store, runs_dir=tmp_path / "runs", base_model=str(tiny_model_dir),
                           model_cache=tmp_path / "cache")  # fmt: skip
        run_id = runner.submit("reward", QUICK_RUN)
        status = runner.wait(run_id, timeout=300)
        assert status.status == "succeeded", status.error
        version = store.get_version(status.result_version)
        assert version["kind"] == "reward" and version["adapter_path"].endswith("reward_model")
        assert store.list_versions("policy")[-1]["id"] == 0  # a reward model is not a policy version
        with store.read() as cur:
            generations = cur.execute("SELECT count(*) FROM generations").fetchone()[0]
            scored = cur.execute(
                "SELECT count(*) FROM reward_scores WHERE reward_model_id = ?", [status.result_version]
            ).fetchone()[0]
        assert scored == generations == 16
        scores = comparison_scores(store, comparisons)
        assert set(scores) == set(comparisons)
        assert all(isinstance(a, float) and isinstance(b, float) for a, b in scores.values())
    finally:
        store.close()

"""The Train tab's Auto method: which trainer the mix of judgements picks, and the reason shown with the run."""

from __future__ import annotations

import pytest

from storage.db import Store
from tests.datahelpers import seed_preferences
from training.datamix import DataMix, choose_method, data_mix, resolve_method
from training.runner import JobRunner

QUICK = {"max_steps": 2, "batch_size": 2, "max_length": 64, "before_after_prompts": 0}


def mix(clear=0, ties=0, both_bad=0, edited=0, pairs=None, kto_rows=None) -> DataMix:
    pairs = clear + 2 * edited if pairs is None else pairs
    kto_rows = 2 * (clear + both_bad) + edited if kto_rows is None else kto_rows
    return DataMix(clear + ties + both_bad, clear, ties, both_bad, edited, pairs, kto_rows)


@pytest.mark.parametrize(
    ("data", "method", "words"),
    [
        (mix(clear=30, ties=30), "dpo", "30 clear preference pairs"),
        (mix(clear=30, ties=20, both_bad=20), "kto", "20 of 70 judgements are 'both bad'"),
        (mix(clear=2, ties=10, both_bad=3), "kto", "only 2 clear pairs"),
        (mix(clear=30, ties=20, edited=6), "sft_dpo", "6 of 50 judgements carry an edited answer"),
        (mix(clear=40, ties=20, edited=2), "dpo", "clear preference pairs"),  # 2 edits: under 10 %
    ],
)
def test_the_mix_picks_the_method_and_says_why(data, method, words):
    chosen, reason = choose_method(data)
    assert chosen == method and words in reason
    assert reason.startswith("Auto chose") and data.describe() in reason


def add_both_bad(store, n: int) -> None:
    for i in range(n):
        prompt = store.add_prompt([{"role": "user", "content": f"Name a colour (#{i})."}], "test")
        a = store.add_generation(prompt, "Blue blue blue.", model_version_id=0, params={"seed": i})
        b = store.add_generation(prompt, "Nope.", model_version_id=0, params={"seed": i + 50})
        store.add_comparison(
            prompt_id=prompt, generation_a=a, generation_b=b, annotator="t", choice="both_bad", source="test"
        )


def test_auto_runs_the_chosen_method_and_the_run_says_why(tmp_path, tiny_model_dir):
    store = Store(tmp_path / "auto.duckdb")
    try:
        seed_preferences(store, 4)
        add_both_bad(store, 4)
        assert data_mix(store) == DataMix(8, 4, 0, 4, 0, 4, 16)
        runner = JobRunner(store, runs_dir=tmp_path / "runs", base_model=str(tiny_model_dir))
        run_id = runner.submit("auto", QUICK)
        status = runner.wait(run_id, timeout=300)
        assert status.method == "kto" and status.run_dir.endswith("-kto")
        assert status.message.startswith("Auto chose KTO: 4 of 8 judgements are 'both bad'")
        assert status.status == "succeeded", status.error
        assert status.snapshot_rows == 16  # every labelled answer, both-bad ones included
        assert store.get_version(status.result_version)["kind"] == "policy"
        assert runner.status(run_id).message == status.message  # kept with the run
        assert resolve_method(store, "dpo") == ("dpo", None)
    finally:
        store.close()


def test_an_edit_of_whitespace_only_is_no_edit(db_url):
    """The exports drop an edit that str.strip() empties; the mix counted it when it held a tab or a newline (SQL's
    trim() takes spaces only), and could pick SFT-then-DPO for edits that give no rows."""
    store = Store(db_url)
    try:
        prompt = store.add_prompt([{"role": "user", "content": "Name a colour."}], "test")
        a = store.add_generation(prompt, "Blue.", model_version_id=0)
        b = store.add_generation(prompt, "Red.", model_version_id=0)
        store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="x", choice="A",
                             edited_answer="\t\n\u00a0")  # fmt: skip
        assert data_mix(store).edited == 0
    finally:
        store.close()

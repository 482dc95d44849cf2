"""KTO, SFT and SFT-then-DPO on the bundled model, through the runner the Train tab uses: the adapter learns, the loss
falls, the base weights stay as they were, and the registered version serves from the generation engine."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see training/__main__.py

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from storage.db import Store  # noqa: E402
from tests.datahelpers import seed_preferences  # noqa: E402
from training.runner import JobRunner, read_progress  # noqa: E402

pytestmark = pytest.mark.slow

# A few steps on short sequences: each run takes well under a minute on 2 CPU cores.
QUICK = {
    "max_steps": 4,
    "batch_size": 2,
    "max_length": 48,
    "learning_rate": 2e-3,
    "before_after_prompts": 1,
    "before_after_max_new_tokens": 6,
}
METHODS = ("kto", "sft", "sft_dpo")


def seed_mixed(store) -> None:
    """Clear pairs (a friendly sentence beats "No."), two both-bad votes and one edited answer."""
    ids = seed_preferences(store, 6)
    for i in range(2):
        prompt = store.add_prompt([{"role": "user", "content": f"Name a colour (#{i})."}], "test")
        a = store.add_generation(prompt, "Blue blue blue blue.", model_version_id=0, params={"seed": i})
        b = store.add_generation(prompt, "Nope.", model_version_id=0, params={"seed": i + 50})
        store.add_comparison(
            prompt_id=prompt, generation_a=a, generation_b=b, annotator="t", choice="both_bad", source="test"
        )
    prompt = store.add_prompt([{"role": "user", "content": "Say hello."}], "test")
    a = store.add_generation(prompt, "Hi.", model_version_id=0, params={"seed": 7})
    b = store.add_generation(prompt, "Go away.", model_version_id=0, params={"seed": 8})
    store.add_comparison(
        prompt_id=prompt,
        generation_a=a,
        generation_b=b,
        annotator="t",
        choice="A",
        edited_answer="Hello! Happy to help with anything you need.",
        source="test",
    )
    assert ids


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bundled_model_dir):
    """One real run per method on the bundled model, from one store; {method: (RunStatus, store)}."""
    tmp = tmp_path_factory.mktemp("kto-sft")
    store = Store(tmp / "runs.duckdb")
    seed_mixed(store)
    runner = JobRunner(store, runs_dir=tmp / "runs", base_model=str(bundled_model_dir), model_cache=tmp / "cache")
    statuses = {}
    for method in METHODS:
        run_id = runner.submit(method, QUICK)
        statuses[method] = runner.wait(run_id, timeout=300)
    yield statuses, store
    store.close()


def losses(run_dir: str) -> list[float]:
    """Losses of the last training stage (SFT-then-DPO writes a `start` line per stage)."""
    events = read_progress(run_dir)
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    return [e["loss"] for e in events[last_start:] if e["event"] == "progress"]


@pytest.mark.parametrize("method", METHODS)
def test_run_succeeds_learns_and_registers_a_version(runs, method):
    statuses, store = runs
    status = statuses[method]
    assert status.status == "succeeded", status.error
    assert status.metrics["method"] == method and status.metrics["steps"] == 4
    series = losses(status.run_dir)
    assert len(series) == 4 and series[-1] < series[0], series  # the loss falls
    adapter = f"{status.run_dir}/adapter"
    lora_b = {k: v for k, v in load_file(f"{adapter}/adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values())  # B starts at zero: nonzero B was learned
    version = store.get_version(status.result_version)
    assert version["kind"] == "policy" and version["parent_id"] == 0 and version["adapter_path"] == adapter
    assert status.metrics["before_after"]["kl_to_parent"] is not None


def test_kto_uses_every_label_and_balances_the_weights(runs):
    metrics = runs[0]["kto"].metrics
    # 6 clear pairs (1 + 1 each), 2 both-bad (2 undesirable each), 1 edit (desirable, both originals undesirable)
    assert (metrics["desirable"], metrics["undesirable"]) == (7, 12)
    assert metrics["undesirable_weight"] == pytest.approx(7 / 12, abs=1e-3) and metrics["desirable_weight"] == 1.0


def test_sft_dpo_trains_sft_first_then_dpo_from_it(runs):
    status = runs[0]["sft_dpo"]
    starts = [e for e in read_progress(status.run_dir) if e["event"] == "start"]
    assert [e["total"] for e in starts][1] == 4 and len(starts) == 2  # SFT stage, then 4 DPO steps
    assert status.metrics["sft"]["train_rows"] == 8  # 6 winners + the edit + the winner of the edited pair
    assert status.metrics["reference"].startswith("the SFT stage")


def test_base_weights_are_untouched(runs, bundled_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    status = runs[0]["kto"]
    original = load_file(bundled_model_dir / "model.safetensors")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bundled_model_dir), f"{status.run_dir}/adapter"
    )
    loaded = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in model.named_parameters()
        if "lora_" not in n
    }
    for name, weight in original.items():
        assert torch.equal(weight, loaded[name].detach()), name


def test_the_new_versions_serve(runs, bundled_model_dir):
    from generation.engine import GenerationEngine
    from generation.sampling import SamplingParams

    statuses, store = runs
    engine = GenerationEngine(str(bundled_model_dir), max_batch=4)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=6, seed=1)
        messages = [{"role": "user", "content": "Tell me one fact about tea."}]
        for method in METHODS:
            version = store.get_version(statuses[method].result_version)
            engine.load_version(version["id"], version["adapter_path"])
            answer = engine.submit(messages, params, version["id"]).result(timeout=120)
            assert answer.version == version["id"] and answer.token_count > 0
    finally:
        engine.close()

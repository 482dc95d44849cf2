"""`--engine vllm`: model versions as LoRA adapters on vLLM. vLLM needs a CUDA GPU, so most of this runs against a
stand-in `vllm` module with vLLM's engine-loop API (add_request / step / abort_request); the real one is skipped
unless vllm and CUDA are both present."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from types import SimpleNamespace

import pytest

from generation.sampling import SamplingParams
from generation.vllm_engine import VLLMEngine

MESSAGES = [{"role": "user", "content": "Name a colour."}]


class FakeLLMEngine:
    """vLLM's LLMEngine as the app uses it: one output token per running request per step, text = the adapter name,
    the seed and the token number, so a test can see which adapter and seed each request ran with."""

    model_config = SimpleNamespace(max_model_len=512)

    def __init__(self):
        self.running, self.added, self.aborted = {}, [], []

    def add_request(self, request_id, prompt, params, lora_request=None):
        self.added.append((request_id, prompt, params, lora_request))
        self.running[request_id] = [params, lora_request, 0]

    def abort_request(self, request_ids):
        self.aborted += list(request_ids)
        for request_id in request_ids:
            self.running.pop(request_id, None)

    def step(self):
        outputs = []
        for request_id, state in list(self.running.items()):
            params, lora, state[2] = state[0], state[1], state[2] + 1
            words = [f"{lora.lora_name if lora else 'base'}:{params.seed}:{k}" for k in range(state[2])]
            finished = state[2] >= params.max_tokens
            completion = SimpleNamespace(
                text=" ".join(words), token_ids=list(range(state[2])), finish_reason="length" if finished else None
            )
            outputs.append(SimpleNamespace(request_id=request_id, finished=finished, outputs=[completion]))
            if finished:
                del self.running[request_id]
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    from transformers import AutoTokenizer

    built = []

    class LLM:
        def __init__(self, model, **kwargs):
            self.model, self.kwargs, self.llm_engine = model, kwargs, FakeLLMEngine()
            built.append(self)

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(self.model)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: SimpleNamespace(**kw)
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, number, path: SimpleNamespace(
        lora_name=name, lora_int_id=number, lora_path=path
    )
    for name, module in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return built


def adapter_folder(path, rank: int = 8):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return path


def test_versions_are_lora_requests_and_activation_needs_no_restart(fake_vllm, tiny_model_dir, tmp_path):
    engine = VLLMEngine(str(tiny_model_dir))
    try:
        (llm,) = fake_vllm
        assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 64 and engine.context == 512
        engine.load_version(1, adapter_folder(tmp_path / "run-1" / "adapter"))
        engine.load_version(2, adapter_folder(tmp_path / "run-2" / "adapter"))
        with pytest.raises(ValueError, match="rank 128"):
            engine.load_version(3, adapter_folder(tmp_path / "run-3" / "adapter", rank=128))
        with pytest.raises(ValueError, match="not loaded"):
            engine.submit(MESSAGES, SamplingParams(), 3)

        futures = engine.submit_many(
            [
                (MESSAGES, SamplingParams(max_new_tokens=3, seed=5), 0),
                (MESSAGES, SamplingParams(max_new_tokens=2, seed=6), 2),
            ]
        )
        base, v2 = (f.result(timeout=30) for f in futures)
        assert (base.text, base.version, base.token_count, base.finish_reason) == (
            "base:5:0 base:5:1 base:5:2",
            0,
            3,
            "length",
        )
        assert v2.text == "v2:6:0 v2:6:1" and v2.version == 2
        (_, prompt, params, none), (_, _, _, lora) = llm.llm_engine.added
        assert none is None and (lora.lora_name, lora.lora_int_id) == ("v2", 2)
        assert lora.lora_path.endswith("run-2/adapter")
        assert prompt["prompt_token_ids"] == engine.encode(MESSAGES) and params.seed == 5 and params.max_tokens == 3

        engine.set_active(1)  # serve version 1: same vLLM instance, its adapter on the next request
        assert engine.submit(MESSAGES, SamplingParams(max_new_tokens=1, seed=7)).result(timeout=30).text == "v1:7:0"
        assert len(fake_vllm) == 1

        stream = engine.stream_pair(
            MESSAGES, SamplingParams(max_new_tokens=3, seed=1), SamplingParams(max_new_tokens=2, seed=2), 0, 1
        )
        updates = list(stream)
        assert updates[-1] == ("base:1:0 base:1:1 base:1:2", "v1:2:0 v1:2:1")  # cumulative text after each step
        assert [g.version for g in stream.result] == [0, 1]

        slow = engine.submit(MESSAGES, SamplingParams(max_new_tokens=400, seed=3), 0)
        slow.cancel()
        deadline = time.monotonic() + 10
        while llm.llm_engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not llm.llm_engine.running  # aborted (or never added, when cancelled before the worker saw it)
    finally:
        engine.close()


def test_the_pair_queue_and_the_app_flag_run_on_it(fake_vllm, tiny_model_dir, tmp_path):
    import app
    from labeling.deploy import create_engine
    from labeling.pair_queue import PairQueue
    from storage.db import Store

    engine = create_engine(app.parse_args(["--engine", "vllm", "--model", str(tiny_model_dir)]))
    store = Store(tmp_path / "q.duckdb")
    try:
        assert isinstance(engine, VLLMEngine)
        for i in range(3):
            store.add_prompt(f"Question {i}?", "test")
        assert PairQueue(store, engine, params=SamplingParams(max_new_tokens=4)).generate_pairs(3) == 3
        with store.read() as cur:
            texts = [r[0] for r in cur.execute("SELECT text FROM generations").fetchall()]
        assert len(texts) == 6 and all(t.startswith("base:") for t in texts)
    finally:
        store.close()
        engine.close()


def test_without_vllm_the_error_says_how_to_get_it(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm now fails as if it were not installed
    with pytest.raises(RuntimeError, match="pip install vllm"):
        VLLMEngine(str(tiny_model_dir))


def _vllm_and_cuda() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_and_cuda(), reason="needs vllm installed and a CUDA GPU (pip install vllm)")
def test_real_vllm_serves_a_trained_adapter_without_restart(bundled_model_dir, tmp_path):
    from tests.test_spaces import make_adapter

    engine = VLLMEngine(str(bundled_model_dir), gpu_memory_utilization=0.5, enforce_eager=True)
    try:
        engine.load_version(1, make_adapter(bundled_model_dir, tmp_path / "adapter"))
        params = SamplingParams(max_new_tokens=16, seed=1)
        futures = engine.submit_many([(MESSAGES, params, 0), (MESSAGES, params, 1)])
        base, tuned = (f.result(timeout=300) for f in futures)
        assert base.text and tuned.text and (base.version, tuned.version) == (0, 1)
        engine.set_active(1)
        assert engine.submit(MESSAGES, params).result(timeout=300).version == 1
    finally:
        engine.close()

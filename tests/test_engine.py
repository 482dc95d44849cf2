"""The generation engine on a tiny random Llama: batching, seeds, stop rules, adapters per row, streaming,
and the experimental backends (HTTP against a real local server, vLLM only for its missing-package error)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from generation.backends import BackendError, OpenAICompatibleBackend, VLLMBackend
from generation.sampling import SamplingParams


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def make_adapter(model_dir: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so it visibly changes what the model says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_sampling_params_are_validated():
    assert SamplingParams(seed=3).to_dict() == {
        "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 160, "seed": 3, "repetition_penalty": 1.0
    }  # fmt: skip
    for bad in ({"temperature": -0.1}, {"top_p": 0}, {"top_p": 1.5}, {"max_new_tokens": 0}, {"max_new_tokens": 2.5},
                {"seed": "x"}, {"temperature": float("nan")}, {"repetition_penalty": 0.9},
                {"repetition_penalty": 3}):  # fmt: skip
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams().seeded().seed is not None  # a request without a seed records the one it used


def test_repetition_penalty_makes_the_answer_repeat_itself_less(engine):
    """Greedy decoding of a tiny random model loops on a few tokens; the penalty spreads it over more of them, and a
    penalised row keeps its text whether it is decoded alone or next to an unpenalised one."""
    plain = SamplingParams(temperature=0, max_new_tokens=40)
    penalised = SamplingParams(temperature=0, max_new_tokens=40, repetition_penalty=2.0)
    loop = engine.submit(chat("Repeat after me."), plain).result(timeout=60)
    spread = engine.submit(chat("Repeat after me."), penalised).result(timeout=60)
    assert len(set(spread.token_ids)) > len(set(loop.token_ids))
    prompt = chat("Repeat after me.")
    together = engine.submit_many([(prompt, plain, None), (prompt, penalised, None)])
    assert [f.result(timeout=60).text for f in together] == [loop.text, spread.text]


def test_seeded_request_gives_the_same_text_alone_and_in_a_batch(engine):
    params = SamplingParams(temperature=0.9, max_new_tokens=16, seed=11)
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    alone = engine.submit(chat("Name a fruit."), params).result(timeout=60)
    alone_greedy = engine.submit(chat("Say hello."), greedy).result(timeout=60)
    others = [(chat("pad " * (3 * i + 1)), SamplingParams(max_new_tokens=4 + 3 * i, seed=i), None) for i in range(5)]
    futures = engine.submit_many(others[:3] + [(chat("Name a fruit."), params, None)] + others[3:]
                                 + [(chat("Say hello."), greedy, None)])  # fmt: skip
    batched = [f.result(timeout=60) for f in futures]
    assert engine.stats["max_rows"] == 7  # all seven rows decoded together
    assert batched[3].text == alone.text and batched[3].token_count == alone.token_count == 16
    assert batched[-1].text == alone_greedy.text
    assert batched[3].params.seed == 11 and batched[3].version == 0 and batched[3].model_name is None

    other_seed = engine.submit(chat("Name a fruit."), SamplingParams(temperature=0.9, max_new_tokens=16, seed=12))
    assert other_seed.result(timeout=60).text != alone.text


def test_batching_decodes_rows_in_shared_steps(engine):
    futures = engine.submit_many([(chat(f"Prompt {i}"), SamplingParams(max_new_tokens=10, seed=i), None)
                                  for i in range(8)])  # fmt: skip
    results = [f.result(timeout=60) for f in futures]
    assert [r.token_count for r in results] == [10] * 8
    assert all(r.finish_reason == "length" for r in results)
    assert engine.stats["tokens"] == 80
    assert engine.stats["steps"] < 20  # 80 tokens in ~10 batched steps, not 80 single ones
    assert len({r.text for r in results}) == 8  # different seeds, different answers


def test_generation_stops_at_eos(engine):
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    first = engine.submit(chat("Stop early"), greedy).result(timeout=60)
    assert first.finish_reason == "length" and len(first.token_ids) == 12
    engine.eos_ids.add(first.token_ids[4])  # make the 5th greedy token an end-of-sequence token
    stopped = engine.submit(chat("Stop early"), greedy).result(timeout=60)
    cut = first.token_ids.index(first.token_ids[4])
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == first.token_ids[:cut] and stopped.token_count == cut


def test_rows_of_different_versions_share_a_batch(engine, tiny_model_dir, tmp_path):
    params = SamplingParams(temperature=0.8, max_new_tokens=12, seed=5)
    base_before = engine.submit(chat("Tell me a fact."), params).result(timeout=60)
    with pytest.raises(ValueError, match="version 1 is not loaded"):
        engine.submit(chat("x"), params, version=1)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    engine.load_version(1, adapter)
    engine.load_version(1, adapter)  # idempotent
    assert engine.has_version(1) and not engine.has_version(2)
    new_alone = engine.submit(chat("Tell me a fact."), params, version=1).result(timeout=60)
    mixed = engine.submit_many([(chat("Tell me a fact."), params, 0), (chat("Tell me a fact."), params, 1)])
    base_mixed, new_mixed = (f.result(timeout=60) for f in mixed)
    assert engine.stats["max_rows"] >= 2
    assert base_mixed.text == base_before.text  # loading an adapter leaves the base unchanged
    assert new_mixed.text == new_alone.text and new_mixed.version == 1
    assert new_alone.text != base_before.text  # the adapter changes the answer
    engine.set_active(1)
    assert engine.submit(chat("Tell me a fact."), params).result(timeout=60).version == 1
    with pytest.raises(ValueError):
        engine.set_active(7)


def test_stream_pair_streams_both_sides_while_a_long_request_runs(engine):
    long_request = engine.submit(chat("A long answer please"), SamplingParams(max_new_tokens=400, seed=1))
    while engine.stats["tokens"] < 2:  # the long request is decoding
        time.sleep(0.01)
    stream = engine.stream_pair(chat("Say hi"), SamplingParams(max_new_tokens=8, seed=2),
                                SamplingParams(max_new_tokens=6, seed=3), 0, 0)  # fmt: skip
    updates = list(stream)
    assert not long_request.done()  # the pair joined the running batch instead of waiting for it
    gen_a, gen_b = stream.result
    assert (gen_a.token_count, gen_b.token_count) == (8, 6)
    assert updates[-1] == (gen_a.text, gen_b.text)
    assert len(updates) >= 4  # token by token, not one final update
    assert all(len(a) <= len(gen_a.text) and len(b) <= len(gen_b.text) for a, b in updates)
    long_request.cancel()


def test_bad_requests_fail_at_once(engine):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.submit(chat("word " * 600), SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.submit(chat("hi"), {"temperature": 1})
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        engine.load_version(3, "/nonexistent")
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(chat("hi"), SamplingParams())


class _FakeChatServer(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions with the user's text reversed; remembers the request bodies."""

    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if body["model"] == "missing":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error": "no such model"}')
            return
        text = body["messages"][-1]["content"][::-1]
        reply = {"model": body["model"], "choices": [{"message": {"role": "assistant", "content": text},
                 "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}  # fmt: skip
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_compatible_backend_over_real_http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        backend = OpenAICompatibleBackend(url, "served-model", api_key="k")
        params = SamplingParams(temperature=0.5, max_new_tokens=20, seed=4)
        gens = backend.generate([(chat("abc"), params), (chat("hello"), params)])
        assert [g.text for g in gens] == ["cba", "olleh"]
        assert gens[0].model_name == "served-model" and gens[0].version is None and gens[0].token_count == 3
        sent = _FakeChatServer.bodies[-1]
        assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer k"
        assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["seed"]) == (0.5, 0.95, 20, 4)
        with pytest.raises(BackendError, match="HTTP 404"):
            OpenAICompatibleBackend(url + "/v1", "missing").generate([(chat("x"), params)])
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(BackendError, match="cannot reach"):
        OpenAICompatibleBackend(url, "served-model", timeout=5).generate([(chat("x"), params)])


def test_vllm_backend_says_it_is_not_installed():
    with pytest.raises(BackendError, match="pip install vllm"):
        VLLMBackend("any-model")


def test_a_cancelled_pair_stream_frees_its_engine_rows(engine):
    """An own-prompt stream whose browser went away stops decoding: both futures end cancelled, the engine idles."""
    import time

    params = SamplingParams(max_new_tokens=400, temperature=1.0, seed=3)
    stream = engine.stream_pair([{"role": "user", "content": "Tell me a long story."}], params, params)
    first = next(iter(stream))
    assert isinstance(first, tuple)
    stream.cancel()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(f.done() for f in stream._futures):
        time.sleep(0.05)
    assert all(f.cancelled() for f in stream._futures)
    assert engine.submit([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4, seed=1)).result(60)


def test_an_adapter_unloaded_between_the_check_and_the_queue_fails_only_that_request(engine, tiny_model_dir, tmp_path):
    """unload_versions ran after a request was checked but before it was queued: the worker met a missing adapter
    and failed every row of the batch with it (a KeyError), not only the request for the unloaded version."""
    from generation.sampling import VersionNotLoaded

    engine.load_version(2, make_adapter(tiny_model_dir, tmp_path / "v2"))
    engine.load_version(3, make_adapter(tiny_model_dir, tmp_path / "v3", seed=3))  # PEFT keeps one loaded
    running = engine.submit(chat("Count to twenty."), SamplingParams(max_new_tokens=60, seed=1))
    late = engine._request(chat("Hi"), SamplingParams(max_new_tokens=4), 2)  # checked: version 2 is loaded
    assert engine.unload_versions({3}) == [2]
    with pytest.raises(VersionNotLoaded):
        engine._enqueue([late])
    assert running.result(timeout=60).token_count > 0  # the base's request is unharmed


def test_a_sliding_window_model_batches_like_it_answers_alone(tiny_model_dir, tmp_path):
    """Mistral-style sliding-window attention: the cache's sliding layers dropped the columns the batch rewrites
    when rows joined or left, and every request of a batch failed; now each answer is the same alone or batched."""
    import random

    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from generation.engine import GenerationEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=24, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "sw")
    tokenizer.save_pretrained(tmp_path / "sw")
    engine = GenerationEngine(str(tmp_path / "sw"), max_batch=6)
    try:
        rng = random.Random(1)
        words = [" ".join(rng.choice(["cat", "dog", "sky"]) for _ in range(rng.randint(1, 40))) for _ in range(8)]
        requests = [(chat(w), SamplingParams(temperature=0, max_new_tokens=rng.randint(5, 40), seed=k))
                    for k, w in enumerate(words)]  # fmt: skip
        alone = [engine.submit(m, p).result(timeout=60).token_ids for m, p in requests]
        batched = [f.result(timeout=60).token_ids for f in [engine.submit(m, p) for m, p in requests]]
        assert batched == alone
    finally:
        engine.close()


def test_a_tiny_temperature_samples_instead_of_failing_the_batch(engine):
    """temperature 1e-39 passes validation; its softmax gave NaN and the cutoff failed every row of the batch."""
    other = engine.submit(chat("Hello"), SamplingParams(max_new_tokens=8, seed=3))
    tiny = engine.submit(chat("Hello"), SamplingParams(temperature=1e-39, max_new_tokens=8, seed=3))
    assert tiny.result(timeout=60).token_count > 0 and other.result(timeout=60).token_count > 0

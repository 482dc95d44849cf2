"""The generation engine on vLLM (`--engine vllm`, a CUDA GPU with `pip install vllm`): the interface of
generation.engine.GenerationEngine, so the pair queue, own prompts and version activation work unchanged.

Model versions are LoRA adapters: vLLM starts with `enable_lora`, each loaded version gets one `LoRARequest`
(name "v{id}", id, adapter folder) and every request names its version's adapter (none for version 0, the base).
Loading or activating a version needs no restart: vLLM loads an adapter at its first request and keeps up to
`max_loras` of them on the GPU (more are swapped from CPU memory).

One worker thread drives vLLM's own engine loop (`LLMEngine.add_request` / `step`): requests join the running
batch between steps (vLLM batches continuously), streamed pairs receive the cumulative text after each step, and a
cancelled request is aborted. vllm is imported only here and only when this engine is built.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from concurrent.futures import Future, InvalidStateError
from pathlib import Path

from generation.engine import GenerationEngine
from generation.sampling import Generation, SamplingParams
from generation.streams import PairStream
from models.device import Placement
from models.loading import resolve_model

DEFAULT_CONTEXT = 4096  # tokens, when vLLM does not say (it always does: max_model_len)
MAX_LORA_RANK = 64  # vLLM reserves GPU memory for adapters up to this rank (the app trains rank 8 by default)
MAX_LORAS = 4  # adapters on the GPU at once: the serving version, a candidate, its opponent, one spare
IDLE_WAIT_SECONDS = 0.5  # the worker looks for cancelled requests this often while vLLM is idle


def import_vllm():
    """vllm, or one clear error saying how to get it."""
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise RuntimeError(
            f"--engine vllm needs vLLM on a machine with a CUDA GPU: pip install vllm ({exc})"
        ) from None
    return vllm, LoRARequest


class VLLMEngine:
    def __init__(
        self,
        spec: str = "bundled",
        cache_dir: str | Path = "data/models",
        max_batch: int = 64,
        max_lora_rank: int = MAX_LORA_RANK,
        max_loras: int = MAX_LORAS,
        **engine_args,
    ):
        """`engine_args` go to `vllm.LLM` (e.g. gpu_memory_utilization=0.6 to leave room for a training child)."""
        self._vllm, self._lora_request = import_vllm()
        self.spec, self.max_batch, self.max_lora_rank = spec, max_batch, max_lora_rank
        self.placement = Placement("cuda", "bfloat16")  # what vLLM runs on; labeling/deploy.py asks where that is
        self.llm = self._vllm.LLM(
            model=resolve_model(spec, cache_dir),
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            max_num_seqs=max_batch,
            **engine_args,
        )
        self.tokenizer = self.llm.get_tokenizer()
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.context = int(getattr(config, "max_model_len", 0) or DEFAULT_CONTEXT)
        self.active_version = 0
        self._adapters: dict[int, object] = {0: None}  # version id -> LoRARequest (None: the base model)
        self._tokenizer_lock = threading.Lock()
        self._inbox: list[tuple[str, list[int], SamplingParams, int, Future, object]] = []
        self._running: dict[str, tuple] = {}  # request id -> (future, params, version, listener, started)
        self._ids = itertools.count()
        self._wakeup = threading.Condition()
        self._closed = False
        self.stats = {"steps": 0, "requests": 0}
        self._worker = threading.Thread(target=self._work, name="vllm-engine", daemon=True)
        self._worker.start()

    # ---- versions: one LoRARequest each -------------------------------------------------------------------
    def has_version(self, version_id: int) -> bool:
        return int(version_id) in self._adapters

    def load_version(self, version_id: int, adapter_path: str | Path) -> None:
        """Register a PEFT adapter as version `version_id`; vLLM loads it with its first request."""
        version_id = int(version_id)
        if self.has_version(version_id):
            return
        config_file = Path(adapter_path) / "adapter_config.json"
        if not config_file.is_file():
            raise ValueError(f"{adapter_path} is not a PEFT adapter folder (no adapter_config.json)")
        rank = int(json.loads(config_file.read_text(encoding="utf-8")).get("r", 0))
        if rank > self.max_lora_rank:
            raise ValueError(
                f"the adapter of version {version_id} has LoRA rank {rank}; vLLM was started for "
                f"ranks up to {self.max_lora_rank}"
            )
        self._adapters[version_id] = self._lora_request(f"v{version_id}", version_id, str(Path(adapter_path)))

    def set_active(self, version_id: int) -> None:
        if not self.has_version(version_id):
            raise ValueError(f"version {version_id} is not loaded: call load_version first")
        self.active_version = int(version_id)

    # ---- requests (the same calls as GenerationEngine) ----------------------------------------------------
    def encode(self, messages: list[dict]) -> list[int]:
        with self._tokenizer_lock:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    fit = GenerationEngine.fit  # cuts an over-long chat to the context: the same rule with this tokenizer

    def submit(self, messages: list[dict], params: SamplingParams, version: int | None = None) -> Future:
        return self.submit_many([(messages, params, version)])[0]

    def submit_many(self, requests: list[tuple[list[dict], SamplingParams, int | None]]) -> list[Future]:
        return self._enqueue([self._request(m, p, v) for m, p, v in requests])

    def stream_pair(
        self,
        messages: list[dict],
        params_a: SamplingParams,
        params_b: SamplingParams,
        version_a: int | None = None,
        version_b: int | None = None,
    ) -> PairStream:
        def start(listeners):
            return self._enqueue(
                [
                    self._request(messages, params_a, version_a, listeners[0]),
                    self._request(messages, params_b, version_b, listeners[1]),
                ]
            )

        return PairStream(start)

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()
        self._worker.join(timeout=60)

    def _request(self, messages, params: SamplingParams, version: int | None, listener=None) -> tuple:
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        version = self.active_version if version is None else int(version)
        if not self.has_version(version):
            raise ValueError(f"version {version} is not loaded: call load_version first")
        prompt_ids = self.encode(messages)
        if len(prompt_ids) + params.max_new_tokens > self.context:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; with max_new_tokens {params.max_new_tokens} "
                f"it exceeds the model's context of {self.context} tokens"
            )
        return f"r{next(self._ids)}", prompt_ids, params.seeded(), version, Future(), listener

    def _enqueue(self, requests: list[tuple]) -> list[Future]:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            self._inbox += requests
            self._wakeup.notify_all()
        return [request[4] for request in requests]

    # ---- the worker: vLLM's engine loop -------------------------------------------------------------------
    def _work(self) -> None:
        engine = self.llm.llm_engine
        while True:
            with self._wakeup:
                while not self._inbox and not self._running and not self._closed:
                    self._wakeup.wait(IDLE_WAIT_SECONDS)
                if self._closed:
                    break
                arrivals, self._inbox = self._inbox, []
            try:
                for request_id, prompt_ids, params, version, future, listener in arrivals:
                    if future.cancelled():
                        continue
                    sampling = self._vllm.SamplingParams(
                        temperature=params.temperature,
                        top_p=params.top_p,
                        repetition_penalty=params.repetition_penalty,
                        max_tokens=params.max_new_tokens,
                        seed=params.seed,
                    )
                    engine.add_request(
                        request_id, {"prompt_token_ids": prompt_ids}, sampling, lora_request=self._adapters[version]
                    )
                    self._running[request_id] = (future, params, version, listener, time.perf_counter())
                    self.stats["requests"] += 1
                gone = [rid for rid, running in self._running.items() if running[0].cancelled()]
                if gone:
                    engine.abort_request(gone)
                    for request_id in gone:
                        del self._running[request_id]
                if self._running:
                    self._step(engine)
            except Exception as exc:  # a failed step fails the requests in flight, not the worker
                _fail([r[0] for r in self._running.values()] + [a[4] for a in arrivals], exc)
                with contextlib.suppress(Exception):
                    engine.abort_request(list(self._running))
                self._running.clear()
        with self._wakeup:
            pending, self._inbox = self._inbox, []
        _fail([r[0] for r in self._running.values()] + [p[4] for p in pending], RuntimeError("the engine was closed"))

    def _step(self, engine) -> None:
        self.stats["steps"] += 1
        for output in engine.step():
            running = self._running.get(output.request_id)
            if running is None:
                continue
            future, params, version, listener, started = running
            completion = output.outputs[0]
            if listener is not None:
                listener(completion.text)
            if output.finished:
                del self._running[output.request_id]
                generation = Generation(
                    text=completion.text,
                    token_count=len(completion.token_ids),
                    latency_ms=(time.perf_counter() - started) * 1000,
                    params=params,
                    version=version,
                    finish_reason="length" if completion.finish_reason == "length" else "eos",
                    token_ids=list(completion.token_ids),
                )
                with contextlib.suppress(InvalidStateError):
                    future.set_result(generation)


def _fail(futures: list[Future], exc: Exception) -> None:
    for future in futures:
        with contextlib.suppress(InvalidStateError):
            future.set_exception(exc)

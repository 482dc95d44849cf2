"""The generation engine: one background worker runs every request as part of a shared, continuously refilled batch.

Requests (chat messages + sampling parameters + a model version) are queued by any thread and answered through a
`Future`. The worker keeps one running decode batch: new requests are prefilled (left padded, chat template) and
merged into it between steps, every step decodes one token for every row, and rows leave the batch on EOS or at
their token limit. Rows of different model versions share a batch: adapters are PEFT LoRA adapters named ``v{id}``,
chosen per row with ``adapter_names`` (``"__base__"`` = version 0). The batch and the sampler are in sampling.py,
the streamed pairs in streams.py.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future, InvalidStateError
from pathlib import Path

import torch

from generation.sampling import Batch, Generation, Request, Row, SamplingParams, VersionNotLoaded, sample_next
from generation.streams import PairStream
from models.device import pick_placement
from models.loading import load_base_model, load_tokenizer

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
DEFAULT_CONTEXT = 2048  # tokens, for a model config without max_position_embeddings
CLOSE_TIMEOUT_SECONDS = 60  # close() waits this long for the step in flight (the worker stops after it)

Messages = list[dict]


class GenerationEngine:
    def __init__(
        self,
        spec: str = "bundled",
        cache_dir: str | Path = "data/models",
        max_batch: int = 16,  # rows decoded together: 8 pairs
        threads: int | None = None,
    ):
        """`threads`: torch threads for the worker's forward passes (default: $PREFLOOP_ENGINE_THREADS, else half the
        cores, at least 1). The app trains in a child process on the same cores: two full OpenMP thread teams on 2
        busy cores made a batched step ≈ 10× slower here, one thread for generation did not."""
        if max_batch < 1:
            raise ValueError("max_batch must be ≥ 1")
        self.spec, self.max_batch = spec, max_batch
        half_the_cores = max(1, (os.cpu_count() or 2) // 2)
        self.threads = threads or int(os.environ.get("PREFLOOP_ENGINE_THREADS", "0")) or half_the_cores
        self.placement = pick_placement()
        self.tokenizer = load_tokenizer(spec, cache_dir)
        self.model = load_base_model(spec, cache_dir, self.placement)
        self.config = self.model.config
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.context = int(getattr(self.config, "max_position_embeddings", DEFAULT_CONTEXT))
        self.active_version = 0
        self._peft = None  # the PeftModel wrapping self.model once an adapter is loaded
        self._adapters: dict[int, str] = {0: BASE_ADAPTER}
        self._model_lock = threading.Lock()  # forward passes vs adapter loading
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self._inbox: list[Request] = []
        self._arriving: list[Request] = []  # taken from the inbox by the worker, not yet in the batch
        self._wakeup = threading.Condition()
        self._closed = False
        self._batch: Batch | None = None
        self.stats = {"prefills": 0, "steps": 0, "tokens": 0, "max_rows": 0}  # counters since start (tests, benches)
        self._worker = threading.Thread(target=self._work, name="generation-engine", daemon=True)
        self._worker.start()

    # ---- versions ---------------------------------------------------------------------------------------------
    def has_version(self, version_id: int) -> bool:
        return int(version_id) in self._adapters

    def load_version(self, version_id: int, adapter_path: str | Path) -> None:
        """Load a PEFT adapter as version `version_id` (adapter name f"v{id}"); loading it again does nothing."""
        version_id = int(version_id)
        if self.has_version(version_id):
            return
        if not (Path(adapter_path) / "adapter_config.json").is_file():
            raise ValueError(f"{adapter_path} is not a PEFT adapter folder (no adapter_config.json)")
        name = f"v{version_id}"
        with self._model_lock:
            if self._peft is None:
                from peft import PeftModel

                self._peft = PeftModel.from_pretrained(self.model, str(adapter_path), adapter_name=name)
            else:
                self._peft.load_adapter(str(adapter_path), adapter_name=name)
            self._peft.eval()
            self._adapters[version_id] = name

    def unload_versions(self, keep: set[int]) -> list[int]:
        """Free the adapters of loaded versions outside `keep` (the base and the active version always stay) that no
        waiting or running request uses; the ids freed. Rounds of training would otherwise pile up adapters no pair
        needs (rejected candidates, retired versions); one served again loads from its folder."""
        keep = {0, self.active_version, *map(int, keep)}
        with self._model_lock, self._wakeup:
            rows = self._batch.rows if self._batch else []
            busy = {r.version for r in self._inbox + self._arriving} | {row.request.version for row in rows}
            unused = [v for v in self._adapters if v not in keep and v not in busy]
            if self._peft is not None and len(unused) >= len(self._peft.peft_config):
                unused = unused[1:]  # PEFT keeps one adapter loaded: without any, a PeftModel has no active adapter
            for version in unused:
                self._peft.delete_adapter(self._adapters.pop(version))
        return unused

    def set_active(self, version_id: int) -> None:
        if not self.has_version(version_id):
            raise VersionNotLoaded(f"version {version_id} is not loaded: call load_version first")
        self.active_version = int(version_id)

    # ---- requests ---------------------------------------------------------------------------------------------
    def submit(self, messages: Messages, params: SamplingParams, version: int | None = None) -> Future:
        return self._enqueue([self._request(messages, params, version)])[0]

    def submit_many(self, requests: list[tuple[Messages, SamplingParams, int | None]]) -> list[Future]:
        """Several requests at once (they start in the same batch); all are checked before any is queued."""
        return self._enqueue([self._request(m, p, v) for m, p, v in requests])

    def stream_pair(
        self,
        messages: Messages,
        params_a: SamplingParams,
        params_b: SamplingParams,
        version_a: int | None = None,
        version_b: int | None = None,
    ) -> PairStream:
        """Both answers decode side by side in the shared batch; iterate for cumulative (text_a, text_b)."""

        def start(listeners):
            requests = [
                self._request(messages, params_a, version_a, listeners[0]),
                self._request(messages, params_b, version_b, listeners[1]),
            ]
            return self._enqueue(requests)

        return PairStream(start)

    def encode(self, messages: Messages) -> list[int]:
        with self._tokenizer_lock:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fit(self, messages: Messages, max_new_tokens: int) -> Messages | None:
        """The chat cut to fit the context with `max_new_tokens` to spare: the oldest messages go first (a system
        message stays), then the start of the last one. None when even that cannot fit."""
        budget = self.context - max_new_tokens
        messages = list(messages)
        while (over := len(self.encode(messages)) - budget) > 0:
            drop = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
            if drop is not None:
                del messages[drop]
                continue
            with self._tokenizer_lock:
                ids = self.tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
                if len(ids) <= over + 1:
                    return None
                kept = self.tokenizer.decode(ids[over + 1 :], skip_special_tokens=True)  # +1: decoding may merge
            messages[-1] = {**messages[-1], "content": "…" + kept}
        return messages

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()
        self._worker.join(timeout=CLOSE_TIMEOUT_SECONDS)

    def _request(self, messages: Messages, params: SamplingParams, version: int | None, listener=None) -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        version = self.active_version if version is None else int(version)
        if not self.has_version(version):
            raise VersionNotLoaded(f"version {version} is not loaded: call load_version first")
        prompt_ids = self.encode(messages)
        if len(prompt_ids) + params.max_new_tokens > self.context:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; with max_new_tokens {params.max_new_tokens} it exceeds "
                f"the model's context of {self.context} tokens"
            )
        return Request(prompt_ids, params.seeded(), version, Future(), listener)

    def _enqueue(self, requests: list[Request]) -> list[Future]:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            for request in requests:  # again, under the lock unload_versions holds: it may have run since _request
                if not self.has_version(request.version):
                    raise VersionNotLoaded(f"version {request.version} is not loaded: call load_version first")
            self._inbox += requests
            self._wakeup.notify_all()
        return [r.future for r in requests]

    # ---- the worker -------------------------------------------------------------------------------------------
    def _work(self) -> None:
        torch.set_num_threads(self.threads)  # with OpenMP this sets this thread's forward passes only
        while True:
            with self._wakeup:
                while not self._inbox and self._batch is None and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    break
                room = self.max_batch - (len(self._batch.rows) if self._batch else 0)
                arrivals, self._inbox = self._inbox[:room], self._inbox[room:]
                self._arriving = arrivals
            try:
                with self._model_lock, torch.inference_mode():
                    if arrivals:
                        self._admit(arrivals)
                    self._arriving = []
                    if self._batch is not None:
                        self._step()
            except Exception as exc:  # a failed forward fails the requests in flight, not the worker
                _fail(arrivals + [row.request for row in (self._batch.rows if self._batch else [])], exc)
                self._batch, self._arriving = None, []
        with self._wakeup:
            pending, self._inbox = self._inbox, []
        in_flight = [row.request for row in (self._batch.rows if self._batch else [])]
        _fail(pending + in_flight, RuntimeError("the generation engine was closed"))
        self._batch = None

    def _forward(self, input_ids, mask, positions, cache, rows: list[Row]) -> torch.Tensor:
        kwargs = {}
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        if self._peft is not None:
            kwargs["adapter_names"] = [self._adapters[row.request.version] for row in rows]
        model = self._peft if self._peft is not None else self.model
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: the next token
            **kwargs,
        )
        return out.logits[:, -1, :]

    def _admit(self, requests: list[Request]) -> None:
        """Prefill new requests (left padded), sample their first token and merge them into the running batch."""
        from transformers import DynamicCache

        requests = [r for r in requests if not r.future.cancelled()]
        if not requests:
            return
        self.stats["prefills"] += 1
        device, width = self.placement.device, max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=device)
        real = [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests]  # 1 = real token
        mask = torch.tensor(real, device=device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts from 0 at its first real token
        now = time.perf_counter()
        rows = [Row(r, torch.Generator().manual_seed(r.params.seed), now, len(r.prompt_ids)) for r in requests]
        cache = DynamicCache()  # full layers (no config): a sliding-window layer drops columns Batch.keep and
        # Batch.merge rewrite, and every row of a batch failed on such models (Mistral v0.1, Gemma 2/3)
        logits = self._forward(ids, mask, positions, cache, rows)
        new = Batch(rows, cache, mask, torch.zeros(len(rows), 1, dtype=torch.long, device=device))
        self._advance(new, logits)
        if new.rows and self._batch is not None:
            self._batch.merge(new)
        elif new.rows:
            self._batch = new

    def _step(self) -> None:
        batch = self._batch
        self.stats["steps"] += 1
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.last)], dim=1)
        positions = torch.tensor([[row.position] for row in batch.rows], device=batch.mask.device)
        logits = self._forward(batch.last, batch.mask, positions, batch.cache, batch.rows)
        for row in batch.rows:
            row.position += 1
        self._advance(batch, logits)
        if not batch.rows:
            self._batch = None

    def _advance(self, batch: Batch, logits: torch.Tensor) -> None:
        """Append one sampled token to every row, finish rows on EOS or at their limit, drop them from the batch."""
        keep = []
        for i, (row, token) in enumerate(zip(batch.rows, sample_next(logits, batch.rows), strict=True)):
            if row.request.future.cancelled():  # the caller gave up: free the row
                continue
            if token in self.eos_ids:
                self._finish(row, "eos")
                continue
            row.tokens.append(token)
            self.stats["tokens"] += 1
            batch.last[i, 0] = token
            if row.request.listener is not None:
                row.request.listener(self._decode(row.tokens))
            if len(row.tokens) >= row.request.params.max_new_tokens:
                self._finish(row, "length")
            else:
                keep.append(i)
        if not keep:
            batch.rows.clear()
        elif len(keep) < len(batch.rows):
            batch.keep(keep)

    def _decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, row: Row, reason: str) -> None:
        request = row.request
        generation = Generation(
            text=self._decode(row.tokens),
            token_count=len(row.tokens),
            latency_ms=(time.perf_counter() - row.started) * 1000,
            params=request.params,
            version=request.version,
            finish_reason=reason,
            token_ids=list(row.tokens),
        )
        with contextlib.suppress(InvalidStateError):  # cancelled by the caller meanwhile
            request.future.set_result(generation)


def _fail(requests: list[Request], exc: Exception) -> None:
    for request in requests:
        with contextlib.suppress(InvalidStateError):  # already answered or cancelled
            request.future.set_exception(exc)

"""The generation engine: one background worker runs every request as part of a shared, continuously refilled batch.

Requests (chat messages + sampling parameters + a model version) are queued by any thread and answered through a
`Future`. The worker keeps one running decode batch: new requests are prefilled (left padded, chat template) and
merged into it between steps, every step decodes one token for every row, and rows leave the batch on EOS or at
their token limit. Each row samples with its own `torch.Generator`, and the sampler draws a fixed amount of noise per
step, so a seeded request gives the same text alone or among others. Rows of different model versions share a batch:
adapters are PEFT LoRA adapters named ``v{id}``, chosen per row with ``adapter_names`` (``"__base__"`` = version 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from models.device import pick_placement
from models.loading import load_base_model, load_tokenizer

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
SEED_RANGE = 2**31  # seeds drawn for requests that bring none (fits every RNG API)
NUCLEUS_PROBE = 256  # top-k probe before a full sort when finding the top-p cutoff


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 160
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (_is_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number ≥ 0 (0 = greedy), not {self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], not {self.top_p!r}")
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer ≥ 1, not {self.max_new_tokens!r}")
        if not (self.seed is None or _is_int(self.seed)):
            raise ValueError(f"seed must be an integer or None, not {self.seed!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def seeded(self) -> SamplingParams:
        """These parameters with a concrete seed (a fresh random one if none was given), so the run is reproducible."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbelow(SEED_RANGE))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass
class Generation:
    text: str
    token_count: int  # answer tokens, without the final EOS
    latency_ms: float  # from this request's prefill to its last token (queue waiting not included)
    params: SamplingParams  # always with the seed that was used
    version: int | None
    model_name: str | None = None  # None for local versions; the served model's name for an HTTP backend
    finish_reason: str = "eos"  # "eos" or "length"
    token_ids: list[int] = field(default_factory=list, repr=False)


Messages = list[dict]
Listener = Callable[[str], None]  # receives the cumulative text of a streamed row after each token


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams  # seeded
    version: int
    future: Future
    listener: Listener | None = None


@dataclass
class _Row:
    request: _Request
    generator: torch.Generator
    started: float
    position: int  # position id of the next token fed to the model (= real tokens so far)
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Batch:
    """The running decode batch: rows, their KV cache, the padding mask over cache columns, each row's last token."""

    rows: list[_Row]
    cache: object  # transformers DynamicCache, keys/values [rows, heads, columns, head_dim]
    mask: torch.Tensor  # [rows, columns] 1 = real token
    last: torch.Tensor  # [rows, 1] the sampled token not yet in the cache

    def keep(self, indices: list[int]) -> None:
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in indices]
        self.mask, self.last = self.mask[index], self.last[index]
        start = int(self.mask.any(dim=0).long().argmax())  # columns left of this are padding in every row
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]

    def merge(self, other: _Batch) -> None:
        """Append other's rows; the shorter cache is left padded so every row ends at the newest column."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(other.mask, width, -1)])
        self.last = torch.cat([self.last, other.last])
        self.rows += other.rows


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros on the left of dimension `dim` (-1 or -2) up to `width`."""
    missing = width - tensor.shape[dim]
    return F.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0)) if missing else tensor


def sample_next(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """One token per row. Greedy when temperature is 0; else top-p sampling by an exponential race (argmax of p/E):
    each sampled row draws exactly one uniform per vocabulary entry per step from its own generator, so tiny
    numeric differences between batch compositions almost never change the pick (unlike inverse-CDF sampling)."""
    logits = logits.float()
    picks = logits.argmax(dim=-1).tolist()
    sampled = [i for i, row in enumerate(rows) if row.request.params.temperature > 0]
    if not sampled:
        return picks
    temps = torch.tensor([rows[i].request.params.temperature for i in sampled], device=logits.device)
    top_p = torch.tensor([rows[i].request.params.top_p for i in sampled], device=logits.device)
    probs = torch.softmax(logits[sampled] / temps[:, None], dim=-1)
    probs = probs.masked_fill(probs < nucleus_cutoff(probs, top_p), 0.0)
    uniforms = torch.stack([torch.rand(probs.shape[-1], generator=rows[i].generator) for i in sampled])
    exponentials = -torch.log(uniforms).to(probs.device)  # Exp(1) noise; u = 0 gives inf, i.e. never picked
    for i, token in zip(sampled, (probs / exponentials).argmax(dim=-1).tolist(), strict=True):
        picks[i] = token
    return picks


def nucleus_cutoff(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest probability inside the top-p nucleus ([rows, 1]). A top-256 probe settles most rows of a
    real model (86% of SmolLM2 steps at temperature 1) for a fraction of a full 49k-entry sort, which only the rest
    need; the result is the same either way."""
    probe = probs.topk(min(NUCLEUS_PROBE, probs.shape[-1]), dim=-1).values
    cutoff = _cutoff(probe, top_p)
    uncovered = (probe.sum(dim=-1) < top_p).nonzero().flatten()
    if len(uncovered):
        full = probs[uncovered].sort(dim=-1, descending=True).values
        cutoff[uncovered] = _cutoff(full, top_p[uncovered])
    return cutoff


def _cutoff(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    kept = ((sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]).sum(dim=-1, keepdim=True)  # ≥ 1 token
    return sorted_probs.gather(-1, kept.clamp(max=sorted_probs.shape[-1]) - 1)


class GenerationEngine:
    def __init__(self, spec: str = "bundled", cache_dir: str | Path = "data/models", max_batch: int = 16,
                 threads: int | None = None):  # fmt: skip
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
        self.context = int(getattr(self.config, "max_position_embeddings", 2048))
        self.active_version = 0
        self._peft = None  # the PeftModel wrapping self.model once an adapter is loaded
        self._adapters: dict[int, str] = {0: BASE_ADAPTER}
        self._model_lock = threading.Lock()  # forward passes vs adapter loading
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self._inbox: list[_Request] = []
        self._wakeup = threading.Condition()
        self._closed = False
        self._batch: _Batch | None = None
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

    def set_active(self, version_id: int) -> None:
        if not self.has_version(version_id):
            raise ValueError(f"version {version_id} is not loaded: call load_version first")
        self.active_version = int(version_id)

    # ---- requests ---------------------------------------------------------------------------------------------
    def submit(self, messages: Messages, params: SamplingParams, version: int | None = None) -> Future:
        return self._enqueue([self._request(messages, params, version)])[0]

    def submit_many(self, requests: list[tuple[Messages, SamplingParams, int | None]]) -> list[Future]:
        """Several requests at once (they start in the same batch); all are checked before any is queued."""
        return self._enqueue([self._request(m, p, v) for m, p, v in requests])

    def stream_pair(self, messages: Messages, params_a: SamplingParams, params_b: SamplingParams,
                    version_a: int | None = None, version_b: int | None = None) -> PairStream:  # fmt: skip
        """Both answers decode side by side in the shared batch; iterate for cumulative (text_a, text_b)."""
        return PairStream(self, messages, (params_a, params_b), (version_a, version_b))

    def encode(self, messages: Messages) -> list[int]:
        with self._tokenizer_lock:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()
        self._worker.join(timeout=60)

    def _request(self, messages: Messages, params: SamplingParams, version: int | None, listener=None) -> _Request:
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        version = self.active_version if version is None else int(version)
        if not self.has_version(version):
            raise ValueError(f"version {version} is not loaded: call load_version first")
        prompt_ids = self.encode(messages)
        if len(prompt_ids) + params.max_new_tokens > self.context:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; with max_new_tokens {params.max_new_tokens} it exceeds "
                f"the model's context of {self.context} tokens"
            )
        return _Request(prompt_ids, params.seeded(), version, Future(), listener)

    def _enqueue(self, requests: list[_Request]) -> list[Future]:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
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
            try:
                with self._model_lock, torch.inference_mode():
                    if arrivals:
                        self._admit(arrivals)
                    if self._batch is not None:
                        self._step()
            except Exception as exc:  # a failed forward fails the requests in flight, not the worker
                _fail(arrivals + [row.request for row in (self._batch.rows if self._batch else [])], exc)
                self._batch = None
        with self._wakeup:
            pending, self._inbox = self._inbox, []
        _fail(pending + [row.request for row in (self._batch.rows if self._batch else [])],
              RuntimeError("the generation engine was closed"))  # fmt: skip
        self._batch = None

    def _forward(self, input_ids, mask, positions, cache, rows: list[_Row]) -> torch.Tensor:
        kwargs = {}
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        if self._peft is not None:
            kwargs["adapter_names"] = [self._adapters[row.request.version] for row in rows]
        model = self._peft if self._peft is not None else self.model
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **kwargs)  # fmt: skip
        return out.logits[:, -1, :]

    def _admit(self, requests: list[_Request]) -> None:
        """Prefill new requests (left padded), sample their first token and merge them into the running batch."""
        from transformers import DynamicCache

        requests = [r for r in requests if not r.future.cancelled()]
        if not requests:
            return
        self.stats["prefills"] += 1
        device, width = self.placement.device, max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                            device=device)  # fmt: skip
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts from 0 at its first real token
        now = time.perf_counter()
        rows = [_Row(r, torch.Generator().manual_seed(r.params.seed), now, len(r.prompt_ids)) for r in requests]
        cache = DynamicCache(config=self.config)
        logits = self._forward(ids, mask, positions, cache, rows)
        new = _Batch(rows, cache, mask, torch.zeros(len(rows), 1, dtype=torch.long, device=device))
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

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> None:
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

    def _finish(self, row: _Row, reason: str) -> None:
        request = row.request
        generation = Generation(
            text=self._decode(row.tokens), token_count=len(row.tokens),
            latency_ms=(time.perf_counter() - row.started) * 1000, params=request.params, version=request.version,
            finish_reason=reason, token_ids=list(row.tokens),
        )  # fmt: skip
        with contextlib.suppress(InvalidStateError):  # cancelled by the caller meanwhile
            request.future.set_result(generation)


def _fail(requests: list[_Request], exc: Exception) -> None:
    for request in requests:
        with contextlib.suppress(InvalidStateError):  # already answered or cancelled
            request.future.set_exception(exc)


class PairStream:
    """Iterate for cumulative (text_a, text_b) as tokens arrive; afterwards `.result` is (Generation_a, Generation_b).

    Both requests join the engine's shared batch, so a stream never waits for a whole batch of others to finish."""

    def __init__(self, engine: GenerationEngine, messages: Messages, params: tuple, versions: tuple):
        self._events: queue.Queue = queue.Queue()
        requests = []
        for side in (0, 1):
            listener = lambda text, side=side: self._events.put((side, text))  # noqa: E731
            requests.append(engine._request(messages, params[side], versions[side], listener))
        self._futures = engine._enqueue(requests)
        for side, future in enumerate(self._futures):
            future.add_done_callback(lambda _f, side=side: self._events.put((side, None)))
        self.result: tuple[Generation, Generation] | None = None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        texts, finished = ["", ""], [False, False]
        while not all(finished):
            events = [self._events.get()]
            while not self._events.empty():  # coalesce what piled up into one update
                events.append(self._events.get_nowait())
            for side, text in events:
                if text is None:
                    finished[side] = True
                else:
                    texts[side] = text
            yield texts[0], texts[1]
        generations = (self._futures[0].result(), self._futures[1].result())  # raises the worker's error, if any
        self.result = generations
        if (generations[0].text, generations[1].text) != tuple(texts):
            yield generations[0].text, generations[1].text

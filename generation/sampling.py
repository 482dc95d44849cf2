"""Sampling parameters, finished generations, and the tensor side of the engine's decode loop.

A request becomes a row of the running batch (`Batch`): the rows share one KV cache, left padded so that every row
ends at the newest column, and rows join (`Batch.merge`) or leave (`Batch.keep`) between steps. `sample_next` picks
one token per row, each row with its own `torch.Generator`; it draws a fixed amount of noise per row and step, so a
seeded request gives the same text alone or among others.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from generation.defaults import repetition_penalty_problem

FINITE = 1e30  # NaN / inf logits become ±this (divided by MIN_TEMPERATURE it stays below float32's 3.4e38)
MIN_TEMPERATURE = 1e-3


class VersionNotLoaded(ValueError):
    """A request for a model version the engine has not loaded (or has unloaded since: a rejected candidate)."""


SEED_RANGE = 2**31  # seeds drawn for requests that bring none (fits every RNG API)
NUCLEUS_PROBE = 256  # top-k probe before a full sort when finding the top-p cutoff


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy; below 1 sharpens the model's distribution a little
    top_p: float = 0.95  # sample from the smallest set of tokens holding 95% of the probability
    max_new_tokens: int = 160  # short for library callers; the app passes its --max-new-tokens (default 512, README)
    seed: int | None = None
    # > 1 makes tokens the answer already holds less likely (CTRL's penalty: a seen token's logit is divided by it when
    # positive, multiplied when negative); 1 = off. Only the answer's own tokens count, not the prompt's.
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (_is_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number ≥ 0 (0 = greedy), not {self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], not {self.top_p!r}")
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer ≥ 1, not {self.max_new_tokens!r}")
        if problem := repetition_penalty_problem(self.repetition_penalty):
            raise ValueError(f"repetition_penalty {problem}")
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


Listener = Callable[[str], None]  # receives the cumulative text of a streamed row after each token


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams  # seeded
    version: int
    future: Future
    listener: Listener | None = None


@dataclass
class Row:
    request: Request
    generator: torch.Generator
    started: float
    position: int  # position id of the next token fed to the model (= real tokens so far)
    tokens: list[int] = field(default_factory=list)


@dataclass
class Batch:
    """The running decode batch: rows, their KV cache, the padding mask over cache columns, each row's last token."""

    rows: list[Row]
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

    def merge(self, other: Batch) -> None:
        """Append other's rows; the shorter cache is left padded so every row ends at the newest column."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([left_pad(mine.keys, width, -2), left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([left_pad(mine.values, width, -2), left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([left_pad(self.mask, width, -1), left_pad(other.mask, width, -1)])
        self.last = torch.cat([self.last, other.last])
        self.rows += other.rows


def left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros on the left of dimension `dim` (-1 or -2) up to `width`."""
    missing = width - tensor.shape[dim]
    return F.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0)) if missing else tensor


def sample_next(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """One token per row. Greedy when temperature is 0; else top-p sampling by an exponential race (argmax of p/E):
    each sampled row draws exactly one uniform per vocabulary entry per step from its own generator, so tiny
    numeric differences between batch compositions almost never change the pick (unlike inverse-CDF sampling)."""
    # finite values only: a NaN or inf (float16 overflow on a GPU) failed every row of the batch in the cutoff
    logits = torch.nan_to_num(penalise_repeats(logits.float(), rows), nan=-FINITE, posinf=FINITE, neginf=-FINITE)
    picks = logits.argmax(dim=-1).tolist()
    sampled = [i for i, row in enumerate(rows) if row.request.params.temperature > 0]
    if not sampled:
        return picks
    temps = torch.tensor([rows[i].request.params.temperature for i in sampled], device=logits.device)
    temps = temps.clamp(min=MIN_TEMPERATURE)  # below it softmax overflows to NaN; it samples as greedy anyway
    top_p = torch.tensor([rows[i].request.params.top_p for i in sampled], device=logits.device)
    probs = torch.softmax(logits[sampled] / temps[:, None], dim=-1)
    probs = probs.masked_fill(probs < nucleus_cutoff(probs, top_p), 0.0)
    uniforms = torch.stack([torch.rand(probs.shape[-1], generator=rows[i].generator) for i in sampled])
    exponentials = -torch.log(uniforms).to(probs.device)  # Exp(1) noise; u = 0 gives inf, i.e. never picked
    for i, token in zip(sampled, (probs / exponentials).argmax(dim=-1).tolist(), strict=True):
        picks[i] = token
    return picks


def penalise_repeats(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Each row's repetition penalty on the tokens its answer already holds (rows without one are left as they are)."""
    for i, row in enumerate(rows):
        penalty = row.request.params.repetition_penalty
        if penalty != 1.0 and row.tokens:
            seen = torch.tensor(sorted(set(row.tokens)), dtype=torch.long, device=logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


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

"""Optional generation backends (experimental), used only when present. Both answer a batch of (messages, params)
with `Generation` objects, like the local engine does one request at a time.

- `OpenAICompatibleBackend`: any server speaking POST /v1/chat/completions (vLLM, llama.cpp server, TGI, OpenAI…),
  so a person can compare the local model with a served one. Standard library only (urllib). Its generations carry
  `model_name` (the endpoint's model) and `version=None`; store them with `store.add_generation(..., model_name=...)`.
- `VLLMBackend`: on a GPU machine with `pip install vllm`; vllm is imported lazily and its absence is a clear error.

Plugging one in as side B of 'self'/'own' pairs (e.g. an app flag `--backend-b URL`): call
`backend.generate([(messages, params)])[0]` in a thread (or `concurrent.futures.ThreadPoolExecutor.submit`) for
side B while the engine answers side A, then store both as usual (the pair queue's `add_own_pair` accepts any two
`Generation` objects). Sampling seeds are passed on, but remote servers may ignore them.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from generation.sampling import Generation, SamplingParams

HTTP_TIMEOUT_SECONDS = 120.0  # one completion of a few hundred tokens on a busy server
MAX_PARALLEL_REQUESTS = 8  # a batch becomes this many concurrent HTTP requests at most
REPLY_EXCERPT_CHARS = 300  # how much of a bad reply an error message quotes

Batch = list[tuple[list[dict], SamplingParams]]


class BackendError(RuntimeError):
    """A backend could not answer (unreachable, bad reply, not installed); the message says what to do."""


class OpenAICompatibleBackend:
    """Experimental. `base_url` like "http://host:8000" or "http://host:8000/v1"; `model` as the server names it."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = HTTP_TIMEOUT_SECONDS):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the backend URL must start with http:// or https://, not {base_url!r}")
        root = base_url.rstrip("/")
        self.url = (root if root.endswith("/v1") else root + "/v1") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout

    def generate(self, batch: Batch) -> list[Generation]:
        if not batch:
            return []
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_REQUESTS, len(batch))) as pool:
            return list(pool.map(lambda item: self._one(*item), batch))

    def _one(self, messages: list[dict], params: SamplingParams) -> Generation:
        params = params.seeded()
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": params.seed,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:REPLY_EXCERPT_CHARS]
            raise BackendError(f"{self.url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise BackendError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None
        except json.JSONDecodeError:
            raise BackendError(f"{self.url} did not answer with JSON") from None
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            excerpt = str(reply)[:REPLY_EXCERPT_CHARS]
            raise BackendError(f"{self.url} answered without choices[0].message.content: {excerpt}") from None
        tokens = (reply.get("usage") or {}).get("completion_tokens")
        return Generation(
            text=text,
            token_count=int(tokens) if tokens is not None else len(text.split()),  # words when the server omits usage
            latency_ms=(time.perf_counter() - started) * 1000,
            params=params,
            version=None,
            model_name=reply.get("model") or self.model,
            finish_reason="length" if choice.get("finish_reason") == "length" else "eos",
        )


class VLLMBackend:
    """Experimental, for a CUDA machine with vllm installed: batched generation with vllm's own scheduler.

    Not installed here (CPU only); without vllm, constructing it raises BackendError saying how to get it."""

    def __init__(self, model: str, **engine_args):
        try:
            import vllm
        except ImportError:
            raise BackendError(
                "the vLLM backend needs `pip install vllm` on a machine with a CUDA GPU; vllm is not installed here"
            ) from None
        self._vllm = vllm
        self.model = model
        self.llm = vllm.LLM(model=model, **engine_args)

    def generate(self, batch: Batch) -> list[Generation]:
        if not batch:
            return []
        seeded = [(messages, params.seeded()) for messages, params in batch]
        vllm_params = self._vllm.SamplingParams
        sampling = [
            vllm_params(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_new_tokens, seed=p.seed)
            for _, p in seeded
        ]
        started = time.perf_counter()
        outputs = self.llm.chat([messages for messages, _ in seeded], sampling_params=sampling, use_tqdm=False)
        latency_ms = (time.perf_counter() - started) * 1000  # the whole batch: vLLM runs it as one
        results = []
        for (_, params), output in zip(seeded, outputs, strict=True):
            completion = output.outputs[0]
            results.append(
                Generation(
                    text=completion.text,
                    token_count=len(completion.token_ids),
                    latency_ms=latency_ms,
                    params=params,
                    version=None,
                    model_name=self.model,
                    finish_reason="length" if completion.finish_reason == "length" else "eos",
                )
            )
        return results

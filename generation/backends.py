"""Generation backends besides the local engine. Both answer (messages, params) with `Generation` objects.

- `OpenAICompatibleBackend`: any server speaking POST /v1/chat/completions (vLLM, llama.cpp server, TGI, OpenAI…).
  The pair queue's `endpoint` strategy (labeling/endpoint_pairs.py, app flags `--compare-endpoint URL
  --compare-model NAME`) puts it on one side of a pair against the serving version. Standard library only (urllib).
  Its generations carry `model_name` (the configured model name) and `version=None`. Seeds are passed on, but remote
  servers may ignore them.
- `VLLMBackend`: plain batched generation with vLLM on a GPU machine (`pip install vllm`); vllm is imported lazily
  and its absence is a clear error. The app's `--engine vllm` uses generation/vllm_engine.py instead (versions as
  LoRA adapters, the engine interface the queue needs).
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future

from generation.sampling import Generation, SamplingParams

HTTP_TIMEOUT_SECONDS = 120.0  # one completion of a few hundred tokens on a busy server
MAX_PARALLEL_REQUESTS = 8  # a batch becomes this many concurrent HTTP requests at most
REPLY_EXCERPT_CHARS = 300  # how much of a bad reply an error message quotes
READ_BYTES = 65_536  # a JSON reply is read in pieces of at most this, the deadline checked between them
STOPPED = ("content_filter", "abort")  # finish reasons of an answer the server cut short for its own reasons

Batch = list[tuple[list[dict], SamplingParams]]


class BackendError(RuntimeError):
    """A backend could not answer (unreachable, bad reply, not installed); the message says what to do."""


class OpenAICompatibleBackend:
    """A served model behind POST {base_url}/chat/completions. `base_url` like "http://host:8000/v1" (a URL without
    the /v1 suffix gets it); `model` as the server names it, recorded as the generations' `model_name`.

    The server may answer with one JSON object or, when asked to stream (`stream=True`) or of its own accord, with
    server-sent events (`data: {...choices[0].delta.content...}` lines until `data: [DONE]`). `timeout` bounds the
    whole answer, not only each read. `submit` runs requests on a few worker threads and returns futures."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = HTTP_TIMEOUT_SECONDS,
        stream: bool = False,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the backend URL must start with http:// or https://, not {base_url!r}")
        root = base_url.rstrip("/")
        self.url = (root if root.endswith("/v1") else root + "/v1") + "/chat/completions"
        self.model, self.api_key, self.timeout, self.stream = model, api_key, timeout, stream
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (future, messages, params), or None: a worker ends
        self._workers: list[threading.Thread] = []
        self._pool_lock = threading.Lock()

    def generate(self, batch: Batch) -> list[Generation]:
        """Answer a batch (concurrently, at most MAX_PARALLEL_REQUESTS at once); raises the first failure."""
        return [future.result() for future in [self.submit(messages, params) for messages, params in batch]]

    def submit(self, messages: list[dict], params: SamplingParams) -> Future:
        """One request on the backend's worker threads (daemons: a hung server never holds up the app's exit):
        a Future of the Generation, or of the BackendError."""
        future: Future = Future()
        with self._pool_lock:
            if not self._workers:
                self._workers = [
                    threading.Thread(target=self._work, name="openai-backend", daemon=True)
                    for _ in range(MAX_PARALLEL_REQUESTS)
                ]
                for worker in self._workers:
                    worker.start()
            self._jobs.put((future, messages, params))
        return future

    def close(self) -> None:
        """Cancel the requests not started yet and let the workers end (running requests end by their timeout)."""
        with self._pool_lock:
            workers, self._workers = self._workers, []
            while not self._jobs.empty():
                job = self._jobs.get_nowait()
                if job is not None:
                    job[0].cancel()
            for _ in workers:
                self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, messages, params = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._one(messages, params))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)
            del job, future  # an idle worker must not keep the future's callbacks (and what they reach) alive

    def _one(self, messages: list[dict], params: SamplingParams) -> Generation:
        params = params.seeded()
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": params.seed,
            "stream": self.stream,
        }
        if params.repetition_penalty != 1.0:  # a vLLM / TGI extension: sent only when on (OpenAI refuses it)
            body["repetition_penalty"] = params.repetition_penalty
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                if response.headers.get_content_type() == "text/event-stream":
                    text, finish, tokens = self._read_events(response, started)
                else:
                    text, finish, tokens = self._read_json(response, started)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:REPLY_EXCERPT_CHARS]
            raise BackendError(f"{self.url} answered HTTP {exc.code}: {detail}") from None
        except TimeoutError:
            raise BackendError(f"{self.url} did not answer within {self.timeout:g} s (timed out)") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise BackendError(f"{self.url} did not answer within {self.timeout:g} s (timed out)") from None
            raise BackendError(f"cannot reach {self.url}: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, cut off mid-answer
            raise BackendError(f"cannot reach {self.url}: {type(exc).__name__}: {exc}") from None
        if finish in STOPPED:  # cut by the server (a filter, an abort): not an answer to judge
            raise BackendError(f"{self.url} stopped the answer ({finish}): {text[:REPLY_EXCERPT_CHARS]!r}")
        return Generation(
            text=text,
            token_count=tokens
            if isinstance(tokens, int) and tokens >= 0
            else len(text.split()),  # words without usage
            latency_ms=(time.perf_counter() - started) * 1000,
            params=params,
            version=None,
            model_name=self.model,  # the configured name: servers may report a dated snapshot name per reply
            finish_reason="length" if finish == "length" else "eos",
        )

    def _read_json(self, response, started: float) -> tuple[str, str | None, int | None]:
        parts = []  # read as it comes, so `timeout` bounds the whole answer (read() waits per socket read only)
        while chunk := response.read1(READ_BYTES):
            parts.append(chunk)
            if time.perf_counter() - started > self.timeout:
                raise TimeoutError
        raw = b"".join(parts).decode("utf-8", "replace")
        try:
            reply = json.loads(raw)
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
        except json.JSONDecodeError:
            raise BackendError(f"{self.url} did not answer with JSON: {raw[:REPLY_EXCERPT_CHARS]!r}") from None
        except (KeyError, IndexError, TypeError):
            excerpt = raw[:REPLY_EXCERPT_CHARS]
            raise BackendError(f"{self.url} answered without choices[0].message.content: {excerpt}") from None
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        return text, choice.get("finish_reason"), usage.get("completion_tokens")

    def _read_events(self, response, started: float) -> tuple[str, str | None, int | None]:
        """Server-sent events: text from each chunk's choices[0].delta.content, until `data: [DONE]` or the end."""
        parts, finish, tokens, done = [], None, None, False
        for line in response:
            if time.perf_counter() - started > self.timeout:
                raise TimeoutError
            line = line.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise BackendError(
                    f"{self.url} streamed a line that is not JSON: {data[:REPLY_EXCERPT_CHARS]!r}"
                ) from None
            if not isinstance(chunk, dict):
                raise BackendError(
                    f"{self.url} streamed a line that is no JSON object: {data[:REPLY_EXCERPT_CHARS]!r}"
                )
            if "error" in chunk:
                raise BackendError(f"{self.url} streamed an error: {str(chunk['error'])[:REPLY_EXCERPT_CHARS]}")
            for choice in (chunk.get("choices") or [])[:1]:
                parts.append((choice.get("delta") or {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else {}
            tokens = usage.get("completion_tokens", tokens)
        if not done and finish is None:  # the connection closed mid-answer: a cut answer must not look finished
            raise BackendError(f"{self.url} ended the stream before the answer finished: {''.join(parts)[-80:]!r}")
        return "".join(parts), finish, tokens


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
            vllm_params(
                temperature=p.temperature,
                top_p=p.top_p,
                repetition_penalty=p.repetition_penalty,
                max_tokens=p.max_new_tokens,
                seed=p.seed,
            )
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

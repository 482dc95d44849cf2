"""A served model on one side of pairs: a small OpenAI-compatible server started here answers, errs and stalls."""

from __future__ import annotations

import http.server
import json
import random
import threading
import time

import pytest

from generation.backends import BackendError, OpenAICompatibleBackend
from generation.sampling import SamplingParams
from labeling.endpoint_pairs import ENDPOINT, EndpointSide
from labeling.pair_queue import PairQueue
from storage.db import Store
from storage.ratings import leaderboard
from ui.label_tab import _served_model_problem

QUICK = SamplingParams(max_new_tokens=6)
SERVED = "served-model"


class FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """POST /v1/chat/completions. server.mode: "ok" (JSON), "stream" (server-sent events), "error" (HTTP 500),
    "slow" (answers after server.delay seconds), "garbage" (not JSON)."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append((self.path, body, self.headers.get("authorization")))
        mode = self.server.mode
        text = f"served answer to: {body['messages'][-1]['content']}"
        if mode == "error":
            time.sleep(getattr(self.server, "error_delay", 0.0))
            return self.reply(500, b'{"error": {"message": "the model is overloaded"}}')
        if mode == "garbage":
            return self.reply(200, b"<html>gateway</html>")
        if mode == "slow":
            time.sleep(self.server.delay)
        if mode == "drip":  # a whole answer, one byte at a time: every read is quick, the answer is not
            return self.reply(200, json.dumps({"choices": [{"message": {"content": text}}]}).encode(), drip=0.03)
        if mode in ("cut", "filtered"):  # the connection closes mid-stream / the server's filter stops the answer
            first = {"choices": [{"delta": {"content": "The answer is"}, "finish_reason": None}]}
            last = [] if mode == "cut" else [{"choices": [{"delta": {}, "finish_reason": "content_filter"}]}]
            data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in [first, *last])
            return self.reply(200, data + (b"data: [DONE]\n\n" if last else b""), "text/event-stream")
        if mode == "stream" or body.get("stream"):
            chunks = [{"choices": [{"delta": {"content": w + " "}, "finish_reason": None}]} for w in text.split()]
            chunks[-1]["choices"][0]["finish_reason"] = "length"
            events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
            return self.reply(200, events, "text/event-stream")
        answer = {"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        reply = {"model": "served-model-2025-01-01", "usage": {"completion_tokens": 5}, "choices": [answer]}
        self.reply(200, json.dumps(reply).encode())

    def reply(self, status: int, data: bytes, kind: str = "application/json", drip: float = 0.0) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(0, len(data), 1 if drip else len(data)):
                self.wfile.write(data[i : i + 1] if drip else data)
                self.wfile.flush()
                time.sleep(drip)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    httpd.daemon_threads = True
    httpd.mode, httpd.delay, httpd.requests = "ok", 3.0, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "queue.duckdb")
    for i in range(8):
        store.add_prompt(f"Question number {i}?", "test")
    yield store
    store.close()


def rows(store, sql: str, params=None) -> list[tuple]:
    with store.read() as cur:
        return cur.execute(sql, params or []).fetchall()


def wait_until(condition, timeout: float = 60.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def endpoint_pairs(store) -> list[tuple]:
    """(pair id, status, side a (version, model name), side b (version, model name)) of every endpoint pair."""
    return rows(store, """SELECT p.id, p.status, ga.model_version_id, ga.model_name, gb.model_version_id,
                                 gb.model_name, ga.params, gb.params, ga.text, gb.text
                          FROM pairs p JOIN generations ga ON ga.id = p.generation_a
                          JOIN generations gb ON gb.id = p.generation_b
                          WHERE p.strategy = 'endpoint' ORDER BY p.id""")  # fmt: skip


def test_the_backend_reads_json_and_streamed_answers_and_fails_clearly(server):
    backend = OpenAICompatibleBackend(server.url, SERVED, api_key="sk-test", timeout=1.0)
    messages = [{"role": "user", "content": "Hi?"}]
    gen = backend.generate([(messages, QUICK)])[0]
    path, body, auth = server.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == SERVED and body["messages"] == messages and body["max_tokens"] == 6
    assert body["seed"] == gen.params.seed and body["stream"] is False
    assert (gen.text, gen.model_name, gen.version, gen.token_count) == ("served answer to: Hi?", SERVED, None, 5)

    server.mode = "stream"  # a server that streams whether asked or not
    gen = backend.generate([(messages, QUICK)])[0]
    assert gen.text.split() == "served answer to: Hi?".split() and gen.finish_reason == "length"
    streaming = OpenAICompatibleBackend(server.url.removesuffix("/v1"), SERVED, stream=True)  # /v1 is added
    server.mode = "ok"
    assert streaming.generate([(messages, QUICK)])[0].text.strip() == "served answer to: Hi?"
    assert server.requests[-1][1]["stream"] is True

    for mode, message in [("error", "HTTP 500.*overloaded"), ("garbage", "did not answer with JSON"),
                          ("slow", "did not answer within 1 s"), ("drip", "did not answer within 1 s"),
                          ("cut", "ended the stream before the answer finished"),
                          ("filtered", "stopped the answer \\(content_filter\\)")]:  # fmt: skip
        server.mode = mode
        with pytest.raises(BackendError, match=message):
            backend.generate([(messages, QUICK)])
    closed = OpenAICompatibleBackend("http://127.0.0.1:9/v1", SERVED, timeout=1.0)  # the discard port: refused
    with pytest.raises(BackendError, match="cannot reach http://127.0.0.1:9/v1/chat/completions"):
        closed.generate([(messages, QUICK)])


def test_sides_are_random_and_share_one_seed():
    side = EndpointSide(OpenAICompatibleBackend("http://127.0.0.1:9", SERVED))
    plans = side.plans([(i, [{"role": "user", "content": "x"}]) for i in range(200)], QUICK, 3, random.Random(0))
    first = [plan[3][0] for plan in plans]
    assert set(first) == {3, ENDPOINT} and 60 < first.count(ENDPOINT) < 140
    assert all(plan[2][0] == plan[2][1] and plan[2][0].seed is not None for plan in plans)


def test_endpoint_pairs_record_the_served_model_and_reach_the_leaderboard(store, engine, server):
    side = EndpointSide(OpenAICompatibleBackend(server.url, SERVED, timeout=5.0))
    queue = PairQueue(store, engine, target=4, strategies=("endpoint",), params=QUICK, endpoint=side)
    queue.start()
    try:
        made = wait_until(lambda: len(endpoint_pairs(store)) >= 4 and endpoint_pairs(store), what="endpoint pairs")
        for _, status, version_a, name_a, version_b, name_b, params_a, params_b, text_a, text_b in made:
            assert status == "ready"
            assert {(version_a, name_a), (version_b, name_b)} == {(0, None), (None, SERVED)}  # one side each
            assert json.loads(params_a)["seed"] == json.loads(params_b)["seed"]
            assert (text_a if name_a else text_b).startswith("served answer to: Question number")
        for _ in range(4):  # vote on them: the served model appears on the leaderboard under its name
            pair = queue.next_pair("alice")
            assert "version_a" in pair  # known to the server, shown on the page only after the vote
            queue.record_vote(pair["pair_id"], "alice", "A" if pair["version_a"] == SERVED else "B")
        board = {row["model"]: row for row in leaderboard(store, bootstrap=0)}
        assert set(board) == {"v0", SERVED} and board[SERVED]["battles"] == 4
        assert board[SERVED]["rating"] > board["v0"]["rating"]
        assert queue.progress()["endpoint"] is None  # healthy: no status to show
    finally:
        queue.stop()


@pytest.mark.parametrize("mode, reason", [("error", "HTTP 500"), ("slow", "did not answer within 1 s")])
def test_a_failing_endpoint_makes_no_pair_and_self_pairs_keep_the_queue_full(store, engine, server, mode, reason):
    server.mode = mode
    side = EndpointSide(OpenAICompatibleBackend(server.url, SERVED, timeout=1.0), backoff_s=0.5, max_backoff_s=1.0)
    queue = PairQueue(store, engine, target=6, strategies=("self", "endpoint"), params=QUICK, endpoint=side)
    queue.start()
    try:
        wait_until(lambda: server.requests and side.last_error, what="a failed request")
        status = wait_until(lambda: queue.progress()["endpoint"], what="a status")
        assert reason in status and SERVED in status and "other pairs continue" in status
        assert reason in _served_model_problem(queue)  # the line under the Label tab's counters
        wait_until(lambda: queue.progress()["per_strategy"]["self"]["ready"] >= 6, what="a full queue of self pairs")
        assert endpoint_pairs(store) == []  # a failed served side makes no pair
        wait_until(lambda: "generation failed" in (queue.progress()["error"] or ""), what="the queue's error")

        server.mode = "ok"  # the server recovers: after its rest, endpoint pairs come again and the status clears
        time.sleep(side.max_backoff_s + 0.5)
        for _ in range(3):  # take self pairs so the queue has room for new ones
            pair = queue.next_pair("bob")
            queue.record_vote(pair["pair_id"], "bob", "tie")
        wait_until(lambda: endpoint_pairs(store), timeout=60, what="endpoint pairs after recovery")
        assert queue.progress()["endpoint"] is None
    finally:
        queue.stop()


def test_the_endpoint_strategy_needs_a_served_model(store, engine):
    with pytest.raises(ValueError, match="served model"):
        PairQueue(store, engine, strategies=("self", "endpoint"))


def test_app_flags_for_a_served_model(capsys):
    import app

    args = app.parse_args(["--compare-endpoint", "http://gpu:8000/v1", "--compare-model", "llama"])
    assert args.strategy == [*app.DEFAULT_STRATEGIES, "endpoint"]  # a served model is compared by default
    assert app.parse_args(["--compare-endpoint", "http://gpu:8000/v1", "--compare-model", "llama", "--strategy",
                           "self"]).strategy == ["self"]  # fmt: skip
    for argv, message in [(["--strategy", "endpoint"], "needs --compare-endpoint"),
                          (["--compare-endpoint", "http://gpu:8000/v1"], "needs --compare-model"),
                          (["--compare-endpoint", "gpu:8000", "--compare-model", "m"], "must start with http"),
                          (["--backup-hub-repo", "me/backups"], "needs --backup-dir")]:  # fmt: skip
        with pytest.raises(SystemExit):
            app.parse_args(argv)
        assert message in capsys.readouterr().err


def test_pairs_in_flight_when_the_server_fails_are_one_failure_for_the_backoff(engine, server):
    """Four pairs in flight at one HTTP 500 doubled the pause four times (240 s instead of 30)."""
    server.mode, server.error_delay = "error", 0.5  # all four are sent before the first answer comes
    side = EndpointSide(OpenAICompatibleBackend(server.url, SERVED, timeout=5.0), backoff_s=30, max_backoff_s=600)
    messages = [{"role": "user", "content": "Hi?"}]
    futures = [side.submit_pair(engine, [(messages, QUICK, 0), (messages, QUICK, ENDPOINT)]) for _ in range(4)]
    for pair in futures:
        with pytest.raises(BackendError):
            pair[1].result(timeout=30)
    wait_until(lambda: side.status() is not None, what="the failure to be recorded")
    assert "asking again in 30 s" in side.status() or "asking again in 29 s" in side.status()

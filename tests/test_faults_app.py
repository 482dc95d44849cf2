"""Faults of the whole app (issue 11): a saved version of another base model at start, and kill -9 in the middle
of a vote storm. Real app processes on the tiny model, real DuckDB files, gradio_client clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import app as prefloop_app
from labeling.lifecycle import Shutdown
from labeling.services import UserError
from storage.db import Store
from tests.apphelpers import free_port, wait_for
from tests.test_engine import make_adapter

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 8
KILL_AFTER_VOTES = 100  # acknowledged votes before the kill -9; the clients keep voting until the server is gone
READY_PAIRS = 240  # stored before the start, so the storm runs at the speed of votes, not of generation


def other_base_model(out: Path, tokenizer_dir: Path) -> Path:
    """A second tiny Llama with other shapes (hidden 48): an adapter of it cannot load on the usual tiny model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_saved_version_of_another_base_falls_back_to_the_base(tmp_path, tiny_model_dir, capfd):
    """The app was restarted with another --model than the one the served version was trained on: it crashed."""
    other = other_base_model(tmp_path / "other-base", tiny_model_dir)
    adapter = make_adapter(other, tmp_path / "runs" / "v1-adapter")
    db = tmp_path / "app.duckdb"
    store = Store(db)
    version = store.add_version(base_model=str(other), adapter_path=str(adapter), parent_id=0, notes="other base")
    store.set_setting("active_version", str(version))
    store.close()

    runs = str(tmp_path / "runs")
    args = prefloop_app.parse_args(["--db", str(db), "--model", str(tiny_model_dir), "--runs-dir", runs,
                                    "--queue-size", "1", "--max-new-tokens", "8"])  # fmt: skip
    shutdown = Shutdown()
    services = prefloop_app.create_services(args, shutdown)
    try:
        assert services.engine.active_version == 0
        err = capfd.readouterr().err
        assert f"warning: serving the base version: saved version {version} cannot serve" in err
        assert f"trained on the base model {other}" in err and "Traceback" not in err
        with pytest.raises(UserError, match=f"start it with --model {other}"):
            services.activate(version)  # the Train tab refuses it too
        assert services.engine.active_version == 0 and not services.engine.has_version(version)
        wait_for(lambda: services.queue.next_pair("alice"), 120, "a pair from the base version")
    finally:
        shutdown.run()


def test_answers_as_long_as_the_context_are_refused_at_start(tmp_path, tiny_model_dir):
    """--max-new-tokens at or over the model's context set every prompt aside as unusable: the app ran, silent."""
    args = prefloop_app.parse_args(["--db", str(tmp_path / "app.duckdb"), "--model", str(tiny_model_dir),
                                    "--runs-dir", str(tmp_path / "runs"), "--max-new-tokens", "600"])  # fmt: skip
    with pytest.raises(SystemExit, match="--max-new-tokens 600 leaves 0 of the model's 512 context tokens"):
        prefloop_app.create_services(args, Shutdown())
    Store(tmp_path / "app.duckdb").close()  # the store was closed: it opens again


# ---- kill -9 during a vote storm -----------------------------------------------------------------------------
def store_ready_pairs(db: Path, count: int) -> None:
    """`count` ready pairs (prompt, two answers of version 0, the pair row), as the refill would have left them."""
    store = Store(db)
    try:
        for i in range(count):
            prompt = store.add_prompt(f"Storm question {i}?", "test")
            gens = [store.add_generation(prompt, f"Answer {side} to {i}.", model_version_id=0) for side in "ab"]
            with store.transaction() as cur:
                cur.execute(
                    "INSERT INTO pairs (id, prompt_id, strategy, generation_a, generation_b, status) "
                    "VALUES (nextval('pairs_id_seq'), ?, 'self', ?, ?, 'ready')",
                    [prompt, *gens],
                )
    finally:
        store.close()


def start_app(tmp_path: Path, model_dir: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "app.py", "--db", str(tmp_path / "app.duckdb"), "--model", str(model_dir),
           "--port", str(port), "--runs-dir", str(tmp_path / "runs"), "--queue-size", "32",
           "--max-new-tokens", "24"]  # fmt: skip
    log = (tmp_path / "app.log").open("wb")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})  # fmt: skip


def serving(url: str, app: subprocess.Popen, log: Path) -> bool:
    assert app.poll() is None, log.read_text()[-3000:]
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200 and "first pair ready" in log.read_text()
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
def test_kill_9_during_a_vote_storm_loses_no_acknowledged_vote(tmp_path, tiny_model_dir):
    from gradio_client import Client

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    store_ready_pairs(tmp_path / "app.duckdb", READY_PAIRS)
    app = start_app(tmp_path, tiny_model_dir, port)
    acked: list[tuple[int, str, str]] = []  # every vote the server answered "ok"
    lock, killed = threading.Lock(), threading.Event()
    try:
        wait_for(lambda: serving(url, app, tmp_path / "app.log"), 240, "the app to serve")

        def bot(name: str, choice: str) -> None:
            client = Client(url, verbose=False)
            while not killed.is_set():
                try:
                    pair_id, *_ = client.predict(name, api_name="/next_pair")
                    if pair_id is None:
                        time.sleep(0.1)
                        continue
                    if client.predict(pair_id, name, choice, "", "", api_name="/vote") == "ok":
                        with lock:
                            acked.append((int(pair_id), name, choice))
                except Exception:  # the server is gone (or refused a vote): only acknowledged votes count
                    if killed.is_set():
                        return
                    time.sleep(0.1)

        choices = ["A", "B", "tie", "both_bad"]
        bots = [threading.Thread(target=bot, args=(f"bot{i}", choices[i % 4]), daemon=True) for i in range(CLIENTS)]
        started = time.monotonic()
        for thread in bots:
            thread.start()
        wait_for(lambda: len(acked) >= KILL_AFTER_VOTES, 240, f"{KILL_AFTER_VOTES} acknowledged votes")
        os.kill(app.pid, signal.SIGKILL)  # mid-storm: eight clients are voting right now
        app.wait()
        killed.set()
        seconds = time.monotonic() - started
        for thread in bots:
            thread.join(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()

    with lock:
        acknowledged = set(acked)
    store = Store(tmp_path / "app.duckdb")  # the file the killed app left behind (its WAL replayed on open)
    try:
        with store.read() as cur:
            stored = set(
                cur.execute("SELECT pair_id, annotator, choice FROM comparisons WHERE source = 'ui'").fetchall()
            )
            done = {r[0] for r in cur.execute("SELECT id FROM pairs WHERE status = 'done'").fetchall()}
    finally:
        store.close()
    assert len(acknowledged) >= KILL_AFTER_VOTES
    lost = acknowledged - stored
    assert not lost, f"{len(lost)} acknowledged votes lost: {sorted(lost)[:10]}"
    assert {pair for pair, _, _ in acknowledged} <= done
    figures = {"clients": CLIENTS, "acknowledged": len(acknowledged), "found_after_kill": len(acknowledged & stored),
               "stored_unacknowledged": len(stored - acknowledged), "seconds": round(seconds, 1)}  # fmt: skip
    print(f"kill -9 during a vote storm: {json.dumps(figures)}")  # README "Reliability" quotes these (pytest -s)

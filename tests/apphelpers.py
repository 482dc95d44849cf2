"""Start the real app (real DuckDB file, real model, real Gradio server) for API and browser tests."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import app as prefloop_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(tmp_path: Path, model_dir: Path, *extra: str, queue_size: int = 8, wait_pairs: int = 1,
                db: str | None = None):  # fmt: skip
    """Yields (url, services) with a filled pair queue; closes everything afterwards. `db`: default a DuckDB file."""
    from ui.app import build_app

    port = free_port()
    args = prefloop_app.parse_args(
        [
            "--db", db or str(tmp_path / "app.duckdb"), "--model", str(model_dir), "--port", str(port),
            "--runs-dir", str(tmp_path / "runs"), "--queue-size", str(queue_size), "--max-new-tokens", "24",
            "--lease-minutes", "10", *extra,
        ]
    )  # fmt: skip
    access = prefloop_app.load_access(args)
    services = prefloop_app.create_services(args)
    demo = build_app(services, access, upload_max_rows=args.upload_max_rows)
    options = {**prefloop_app.launch_options(args, access), "server_name": "127.0.0.1"}
    try:
        wait_for(lambda: services.queue.depth() >= wait_pairs, 120, "the pair queue to fill")
        demo.queue(default_concurrency_limit=8, max_size=args.queue_max).launch(
            prevent_thread_lock=True, quiet=True, **options
        )
        yield f"http://127.0.0.1:{port}/", services
    finally:
        demo.close()
        if services.arena is not None:
            services.arena.stop()
        services.queue.stop()
        services.runner.stop(cancel_running=True)
        services.engine.close()
        services.store.close()


def wait_for(condition, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def add_prompts(services, texts: list[str]) -> None:
    for text in texts:
        services.store.add_prompt([{"role": "user", "content": text}], "test")
    services.queue.wake()


PROMPTS = [
    "Name a fruit.", "Say hello.", "What is 2 + 2?", "Give me a colour.", "Name an animal.", "Write one word.",
    "What day comes after Monday?", "Name a country.", "Say something kind.", "Count to three.",
    "Name a planet.", "What is water made of?",
]  # fmt: skip

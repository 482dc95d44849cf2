"""Run `python app.py ...` as a real child process (its own signals, its own shutdown path) for deployment tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.apphelpers import free_port

REPO = Path(__file__).resolve().parent.parent


class AppProcess:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM, as a Space or systemd stops the app; its exit code (128 + 15 after the shutdown steps ran)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            tail = self.output()[-3000:]
            raise AssertionError(f"the app did not stop within {timeout} s on SIGTERM:\n{tail}") from None


@contextlib.contextmanager
def app_process(tmp_path: Path, model_dir: Path, *args: str, env: dict | None = None, name: str = "app",
                ready_timeout: float = 180):  # fmt: skip
    """Start app.py on a free port with the tiny model; yield an AppProcess once it answers HTTP; kill it at the end
    if the test did not stop it."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, str(REPO / "app.py"), "--host", "127.0.0.1", "--port", str(port), "--model", str(model_dir),
           "--max-new-tokens", "16", *args]  # fmt: skip
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=child_env)
    app = AppProcess(proc, f"http://127.0.0.1:{port}/", log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the app exited with {proc.returncode}:\n{app.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the app did not answer within {ready_timeout} s:\n{app.output()[-3000:]}")
            try:
                with urllib.request.urlopen(app.url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        yield app
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def table(db: Path, sql: str) -> list[tuple]:
    """Rows of `sql` in the store a stopped app left at `db`."""
    from storage.db import Store

    store = Store(db)
    try:
        with store.read() as cur:
            return cur.execute(sql).fetchall()
    finally:
        store.close()

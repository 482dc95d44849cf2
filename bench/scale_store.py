"""bench/scale.py's timing helpers and whole-store figures: export, import, `python -m storage stats`, app start."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import scale_data  # noqa: E402


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else 0.0)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    began = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - began, result


# ---- whole-store operations ------------------------------------------------------------------------------------
def export_rate(store, folder: Path) -> dict:
    from storage.exporters import export

    seconds, rows = timed(export, store, "dpo", folder / "dpo.jsonl")
    (folder / "dpo.jsonl").unlink(missing_ok=True)
    return {"export_rows": rows, "export_s": seconds, "export_rows_per_s": rows / seconds if rows else None}


def stats_cli(db: Path, timeout: float) -> float | None:
    began = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "storage", "stats", "--db", str(db)], cwd=ROOT, check=True,
                       capture_output=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    return time.perf_counter() - began


def tiny_model(folder: Path) -> Path:
    """A tiny random Llama with the bundled tokenizer (as tests/conftest.py builds one), cached in `folder`."""
    out = folder / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    from models.loading import resolve_model
    from tests.tinymodel import save_tiny_llama

    return save_tiny_llama(Path(resolve_model("bundled", ROOT / "data" / "models")), out)


def app_start(db: Path, model: Path, folder: Path, timeout: float) -> float | None:
    """Seconds from spawning `python app.py` until its page answers (None: not within `timeout`)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "app.py", "--db", str(db), "--model", str(model), "--port", str(port),
           "--runs-dir", str(folder / "app-runs"), "--queue-size", "2",
           "--max-new-tokens", "64"]  # fmt: skip
    # (--max-new-tokens: the tiny model holds 512 tokens, and the default 512 would leave none for a prompt)
    began = time.perf_counter()
    log = (folder / "app.log").open("w")
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while time.perf_counter() - began < timeout:
            if child.poll() is not None:
                raise SystemExit(f"the app exited with {child.returncode}; see {folder / 'app.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as page:
                    if page.status == 200:
                        return time.perf_counter() - began
            except OSError:
                time.sleep(0.1)
        return None
    finally:
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log.close()


def import_rate(store, folder: Path, start: int, count: int, big_count: int) -> dict:
    """One more `count`-row file, then one `big_count`-row file (comparisons/s of each): a commit costs DuckDB a
    fixed part at a big store (the primary-key indexes written whole at its checkpoint), which a bigger file shares."""
    figures = {}
    for label, rows, first in (("import", count, start), ("import_big", big_count, start + count)):
        figures.update({f"{label}_{name}": value for name, value in _import_one(store, folder, first, rows).items()})
    return figures


def _import_one(store, folder: Path, start: int, count: int) -> dict:
    from storage.importers import import_file

    path = folder / "extra.parquet"
    scale_data.write_chunk(path, start, count, scale_data.answer_pool())
    # What the votes before left in the write-ahead log is checkpointed first, and timed apart: else the import's
    # COMMIT, which crosses DuckDB's checkpoint threshold, pays for writing the pairs and votes changed by voting.
    began = time.perf_counter()
    if store.dialect == "duckdb":
        with store._write_lock, store._con.cursor() as cur:  # no transaction: CHECKPOINT runs outside one
            cur.execute("CHECKPOINT")
    checkpoint = time.perf_counter() - began
    cpu = time.process_time()
    seconds, summary = timed(import_file, store, path, "arena")
    cpu = time.process_time() - cpu  # every thread of this process: the import's CPU, whatever else runs
    path.unlink()
    return {"rows": summary["comparisons"], "one_file_s": seconds, "per_s": summary["comparisons"] / seconds,
            "cpu_s": cpu, "load": os.getloadavg()[0], "checkpoint_before_s": checkpoint}  # fmt: skip

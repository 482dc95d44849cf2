"""Cancel during the before/after samples (the child stops within a token) and upper-case data file extensions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see training/__main__.py

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from training.common import CommonConfig
from training.configparse import ConfigError, parse_config
from training.data import load_rows
from training.ppo import PPORunConfig

REPO = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": [{"role": "user", "content": f"Name a tea (#{i})."}],
         "chosen": [{"role": "assistant", "content": "Green tea."}],
         "rejected": [{"role": "assistant", "content": "No."}]} for i in range(4)]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def wait_for(predicate, child: subprocess.Popen, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert child.poll() is None, f"child exited ({child.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.1)


def test_cancel_stops_the_before_after_samples_promptly(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    run_dir, log = tmp_path / "run", tmp_path / "child.log"
    # 4 prompts × 480 new tokens × 3 samplings: ~20 s on the tiny model (prompt + answer stays under its 512 positions)
    cmd = [sys.executable, "-m", "training", "dpo", "--data", str(data), "--out", str(run_dir), "--base-model",
           str(tiny_model_dir), "--max-steps", "1", "--batch-size", "2", "--max-length", "64",
           "--before-after-prompts", "4", "--before-after-max-new-tokens", "480"]  # fmt: skip
    with log.open("w") as out:
        child = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: "before/after:" in log.read_text(), child, 120, "before/after start")
        time.sleep(1.5)  # the tiny model loads in well under a second: sampling is under way
        os.kill(child.pid, signal.SIGTERM)
        sent = time.monotonic()
        assert child.wait(timeout=8) == 0, log.read_text()[-2000:]  # without the fix: ~20 s more of sampling
        assert time.monotonic() - sent < 5
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    lines = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if e["event"] == "progress"][-1] == 1  # training had finished
    assert lines[-1]["event"] == "end" and lines[-1]["status"] == "cancelled"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()  # the trained adapter is kept
    assert not (run_dir / "before_after.json").exists()
    assert "before_after" not in json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["UP.JSONL", "up.Json", "UP.PARQUET"])
def test_upper_case_data_extensions_are_read(tmp_path, name):
    path = tmp_path / name
    if name.lower().endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif name.lower().endswith(".jsonl"):
        write_jsonl(path, ROWS)
    else:
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_rows(path) == ROWS
    cfg = parse_config(CommonConfig, ["--data", str(path), "--out", str(tmp_path / "run")])  # validate() passes
    assert cfg.data == str(path)
    PPORunConfig(data=str(path), out=str(tmp_path / "run"), prompts=str(path)).validate_rollout()


def test_other_extensions_are_still_refused(tmp_path):
    path = write_jsonl(tmp_path / "pairs.TXT", ROWS)
    with pytest.raises(ConfigError, match="data: .*use one of .jsonl, .json, .parquet"):
        parse_config(CommonConfig, ["--data", str(path), "--out", str(tmp_path / "run")])

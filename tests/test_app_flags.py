"""Start-up validation of app.py: a bad flag or PREFLOOP_* variable is one clear line and exit 2 before anything
loads, never a traceback after the model loaded, a server that makes no pair, or a value silently taken as another.

Each bad start runs `python app.py` as a child in an empty folder, with --db, --runs-dir and --model-cache in it and
a --model that cannot load: only a refusal before the store and the model passes (the folder stays empty)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import app as prefloop_app

REPO = Path(__file__).resolve().parent.parent
ERROR = "app.py: error: "

BAD_STARTS = [  # (flags, variables, what the error line must name)
    (["--lease-minutes", "0"], {}, "--lease-minutes (or PREFLOOP_LEASE_MINUTES) must be in (0, 10080] minutes"),
    (["--lease-minutes", "nan"], {}, "--lease-minutes"),
    (["--queue-size", "-3"], {}, "--queue-size (or PREFLOOP_QUEUE_SIZE) must be ≥ 1"),
    (["--queue-size", "0"], {}, "--queue-size (or PREFLOOP_QUEUE_SIZE) must be ≥ 1"),  # DuckDB: no pair ever
    (["--arena-share", "2"], {}, "--arena-share (or PREFLOOP_ARENA_SHARE) must be a share of the new pairs in [0, 1]"),
    (["--gate-confidence", "1.5"], {}, "--gate-confidence (or PREFLOOP_GATE_CONFIDENCE) must be in (0.5, 1)"),
    (["--gate-min-battles", "0"], {}, "--gate-min-battles (or PREFLOOP_GATE_MIN_BATTLES) must be ≥ 1"),
    (["--max-new-tokens", "0"], {}, "--max-new-tokens (or PREFLOOP_MAX_NEW_TOKENS) must be ≥ 1"),
    (["--engine-threads", "-2"], {}, "--engine-threads (or PREFLOOP_ENGINE_THREADS) must be ≥ 1 threads"),
    ([], {"PREFLOOP_ENGINE_THREADS": "-2"}, "--engine-threads (or PREFLOOP_ENGINE_THREADS) must be ≥ 1 threads"),
    (["--port", "0"], {}, "--port (or PREFLOOP_PORT, else GRADIO_SERVER_PORT) must be a port in [1, 65535]"),
    ([], {"GRADIO_SERVER_PORT": "0"}, "--port (or PREFLOOP_PORT, else GRADIO_SERVER_PORT) must be a port in"),
    (["--compare-timeout", "inf"], {}, "--compare-timeout (or PREFLOOP_COMPARE_TIMEOUT) must be a finite number"),
    (["--guidelines", "missing.md"], {}, "--guidelines (or PREFLOOP_GUIDELINES): no such file: missing.md"),
    ([], {"PREFLOOP_GUIDELINES": "missing.md"}, "--guidelines (or PREFLOOP_GUIDELINES): no such file: missing.md"),
    (["--help"], {"PREFLOOP_PORT": "abc"}, "PREFLOOP_PORT must be an integer, not 'abc'"),
    ([], {"PREFLOOP_QUEUE_SIZE": "eight"}, "PREFLOOP_QUEUE_SIZE must be an integer, not 'eight'"),
    ([], {"PREFLOOP_ENGINE_THREADS": ""}, "PREFLOOP_ENGINE_THREADS must be an integer, not ''"),
    ([], {"PREFLOOP_LEASE_MINUTES": "ten"}, "PREFLOOP_LEASE_MINUTES must be a number, not 'ten'"),
    ([], {"PREFLOOP_REPETITION_PENALTY": "x"}, "PREFLOOP_REPETITION_PENALTY must be a number, not 'x'"),
    ([], {"PREFLOOP_BACKUP_EVERY": "5m"}, "PREFLOOP_BACKUP_EVERY must be a number, not '5m'"),
    ([], {"PREFLOOP_COMPARE_TIMEOUT": "1min"}, "PREFLOOP_COMPARE_TIMEOUT must be a number, not '1min'"),
    ([], {"PREFLOOP_ENGINE": "gpu"}, "PREFLOOP_ENGINE must be one of local, vllm, not 'gpu'"),
    ([], {"PREFLOOP_AUTO_PROMOTE": "maybe"}, "PREFLOOP_AUTO_PROMOTE must be 1/true/yes/on or 0/false/no/off"),
    ([], {"PREFLOOP_ALLOW_TRAINING": "si"}, "PREFLOOP_ALLOW_TRAINING must be 1/true/yes/on or 0/false/no/off"),
    ([], {"PREFLOOP_DEVICE": "gpu"}, "PREFLOOP_DEVICE must be one of auto, cuda, cpu, not 'gpu'"),
    ([], {"PREFLOOP_VLLM_GPU_MEMORY": "2"}, "PREFLOOP_VLLM_GPU_MEMORY must be a share of the GPU memory in (0, 1]"),
]


def clean_env(**variables: str) -> dict:
    """This process's environment without the app's variables (a developer's shell must not change a case)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    for name in ("GRADIO_SERVER_PORT", "SPACE_ID", "SPACE_HARDWARE"):
        env.pop(name, None)
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **variables}


def case_id(case) -> str:
    flags, variables, _ = case
    return " ".join([*(f"{name}={value}" for name, value in variables.items()), *flags])


@pytest.mark.parametrize(("flags", "variables", "named"), BAD_STARTS, ids=[case_id(case) for case in BAD_STARTS])
def test_a_bad_flag_or_variable_is_refused_before_anything_loads(tmp_path, flags, variables, named):
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, str(REPO / "app.py"), "--db", str(work / "app.duckdb"), "--runs-dir", str(work / "runs"),
           "--model-cache", str(work / "models"), "--model", str(work / "no-model"), *flags]  # fmt: skip
    done = subprocess.run(cmd, cwd=work, env=clean_env(**variables), capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith(ERROR) and named in lines[-1], done.stderr[-3000:]
    assert sum(line.startswith(ERROR) for line in lines) == 1  # the one line, after argparse's usage
    assert list(work.iterdir()) == []  # no database, no runs folder, no model cache


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [("PREFLOOP_MAX_NEW_TOKENS", "abc", "an integer"), ("PREFLOOP_REPETITION_PENALTY", "x", "a number")],
)
def test_the_labeling_cli_names_a_bad_variable_in_one_line(tmp_path, variable, value, named):
    """`python -m labeling generate` crashed with a traceback on these (app.py gave one line)."""
    cmd = [sys.executable, "-m", "labeling", "generate", "--pairs", "1", "--db", str(tmp_path / "store.duckdb")]
    env = clean_env(**{variable: value})
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].endswith(f"error: {variable} must be {named}, not {value!r}")
    assert list(tmp_path.iterdir()) == []


def test_yes_no_variables_take_the_usual_spellings(monkeypatch):
    """PREFLOOP_AUTO_PROMOTE=on was silently false."""
    for raw, expected in {"1": True, "true": True, "Yes": True, "on": True, "ON": True, "0": False, "false": False,
                          "no": False, "off": False, "": False}.items():  # fmt: skip
        monkeypatch.setenv("PREFLOOP_AUTO_PROMOTE", raw)
        assert prefloop_app.parse_args([]).auto_promote is expected, raw
    monkeypatch.delenv("PREFLOOP_AUTO_PROMOTE")
    assert prefloop_app.parse_args([]).auto_promote is False


def test_values_at_the_edges_are_still_accepted(tmp_path, monkeypatch):
    """The checks refuse only what cannot work: a guard that the ranges are not narrower than the app's meaning."""
    for name in [k for k in os.environ if k.startswith("PREFLOOP_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no docs/guidelines.md here: the default file stays optional
    args = prefloop_app.parse_args(["--engine-threads", "0", "--arena-share", "0", "--gate-confidence", "0.51"])
    assert args.guidelines == prefloop_app.GUIDELINES and args.engine_threads == 0 and args.arena_share == 0
    guidelines = tmp_path / "rules.md"
    guidelines.write_text("# Rules\n", encoding="utf-8")
    args = prefloop_app.parse_args(["--guidelines", str(guidelines), "--arena-share", "1", "--lease-minutes", "0.5"])
    assert args.guidelines == str(guidelines)
    postgres = prefloop_app.parse_args(["--db", "postgresql://prefloop@dbhost/prefloop", "--queue-size", "0"])
    assert postgres.queue_size == 0  # other app processes on the shared store make the pairs

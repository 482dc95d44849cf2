"""Shared fixtures: a tiny random Llama (fast unit tests) and the real bundled model (marked slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in the app and the training child (shared cores)

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("PREFLOOP_MODEL_CACHE", REPO / "data" / "models"))


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the shared model cache."""
    from models.loading import resolve_model

    return Path(resolve_model("bundled", MODEL_CACHE))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_model_dir) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with the bundled tokenizer and chat template, saved locally."""
    from tests.tinymodel import save_tiny_llama

    return save_tiny_llama(bundled_model_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def engine(tiny_model_dir):
    """A generation engine on the tiny model (batches of up to 8 rows), closed after the test."""
    from generation.engine import GenerationEngine

    engine = GenerationEngine(str(tiny_model_dir), max_batch=8)
    yield engine
    engine.close()


# ---- PostgreSQL: the storage and queue tests run on both backends (tests/pgserver.py) --------------------------
@pytest.fixture(scope="session")
def pg_server():
    from tests.pgserver import PgServer

    try:
        server = PgServer()
    except Exception as exc:  # noqa: BLE001 - no server here: skip, unless CI demands one
        if os.environ.get("PREFLOOP_REQUIRE_PG") == "1":
            raise
        pytest.skip(f"no PostgreSQL for the tests: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["duckdb", "postgres"])
def db_url(request, tmp_path) -> str:
    """A fresh store location: a DuckDB file, or a new database on the test PostgreSQL server."""
    if request.param == "duckdb":
        return str(tmp_path / "store.duckdb")
    return request.getfixturevalue("pg_server").new_database()

"""The app on a PostgreSQL store, as one person uses it: pairs, votes, undo, and what the Data, Train and
Leaderboard tabs show (their handlers, as the page calls them), then an export through the Data tab."""

from __future__ import annotations

import json
import time

import pytest

from labeling.access import Access
from tests.apphelpers import running_app
from tests.test_engine import make_adapter
from ui.data_tab import DataHandlers
from ui.leaderboard_tab import LeaderboardHandlers
from ui.train_tab import TrainHandlers

pytestmark = pytest.mark.slow


def test_the_tabs_work_on_postgres(pg_server, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("storage.tallies.PG_FRESH_SECONDS", 0)  # counts as of each call (the app: at most 2 s old)
    url = pg_server.new_database()
    with running_app(tmp_path, tiny_model_dir, queue_size=6, wait_pairs=5, db=url) as (_, services):
        assert services.store.dialect == "postgres"
        for name, choice in (("ann", "A"), ("bob", "B"), ("cy", "both_bad"), ("ann", "A")):
            pair = services.next_pair(name)
            services.vote(pair["pair_id"], name, choice, rationale=f"{name} thinks so")
        assert services.undo("bob") is not None  # bob's vote is superseded: 3 effective judgements

        access = Access()  # no --auth, loopback: the one user is admin
        per_choice, per_annotator, _, summary, recent = DataHandlers(services, access, 1000).stats(None)
        assert "**3** comparisons" in summary
        assert dict(zip(per_choice["choice"], per_choice["count"], strict=True)) == {"A": 2, "both_bad": 1}
        assert sorted(recent["annotator"]) == ["ann", "ann", "cy"]

        overview = TrainHandlers(services, access).overview(None, None, None, None)
        assert overview[0].startswith("**2** usable preference pairs")  # ann's two A votes

        board = LeaderboardHandlers(services, access).refresh(None)
        assert not str(board[0]).startswith("⚠️")

        out = tmp_path / "dpo.jsonl"
        from storage.exporters import export

        assert export(services.store, "dpo", out) == 2  # written by DuckDB from a copy of the PostgreSQL tables
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(row["chosen"][0]["role"] == "assistant" for row in rows)

        # Another app process on this store serves a new version (its setting): this one follows within 10 s.
        store = services.store
        adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
        version = store.add_version(base_model=store.get_version(0)["base_model"], adapter_path=str(adapter))
        store.set_setting("active_version", str(version))
        deadline = time.monotonic() + 30
        while services.engine.active_version != version:
            assert time.monotonic() < deadline, "the served version was not followed"
            time.sleep(0.2)

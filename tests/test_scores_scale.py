"""Reward scores at scale: saved in short transactions (votes never wait for the whole file), written for scoring
straight from DuckDB, the newest generations first."""

from __future__ import annotations

import threading
import time

from storage.db import Store
from storage.scores import generations_to_score, save_scores, write_generations_to_score
from training.data import load_rows


def scored(store, model: int) -> dict[int, float]:
    with store.read() as cur:
        sql = "SELECT generation_id, score FROM reward_scores WHERE reward_model_id = ?"
        return dict(cur.execute(sql, [model]).fetchall())


def test_scores_are_saved_in_chunks_the_latest_score_of_a_generation_wins():
    store = Store(":memory:")
    pairs = [(i, i / 10) for i in range(1, 12_001)] + [(5, -1.0)]  # generation 5 twice: the later score counts
    assert save_scores(store, 3, pairs, chunk=1_000) == len(pairs)
    saved = scored(store, 3)
    assert len(saved) == 12_000 and saved[5] == -1.0 and saved[12_000] == 1_200.0
    save_scores(store, 3, [(7, 9.0)])  # saving again updates
    assert scored(store, 3)[7] == 9.0 and scored(store, 4) == {}
    store.close()


def test_a_vote_waits_for_one_chunk_not_for_the_whole_save(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    prompt = store.add_prompt("Which?", "t")
    a, b = store.add_generation(prompt, "a"), store.add_generation(prompt, "b")
    saver = threading.Thread(target=save_scores, args=(store, 1, [(i, 0.5) for i in range(200_000)]))
    waits = []
    saver.start()
    while saver.is_alive():
        began = time.perf_counter()
        with store.transaction() as cur:  # what a vote does: one short write transaction
            cur.execute("SELECT 1")
        waits.append(time.perf_counter() - began)
        time.sleep(0.01)
    saver.join()
    assert len(waits) >= 3 and max(waits) < 1.0  # the whole save takes several times longer than any wait
    assert len(scored(store, 1)) == 200_000
    assert store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="x", choice="A")
    store.close()


def test_generations_to_score_are_written_by_duckdb_newest_first_unscored_only(tmp_path):
    store = Store(":memory:")
    prompt = store.add_prompt(
        [{"role": "system", "content": 'Be "brief".\n'}, {"role": "user", "content": "Hi ✓"}], "t"
    )
    ids = [store.add_generation(prompt, f"answer {i} \u2028 \x01") for i in range(6)]
    save_scores(store, 2, [(ids[-1], 0.1)])
    out = tmp_path / "generations.jsonl"
    assert write_generations_to_score(store, 2, out, limit=3) == 3
    rows = load_rows(out)  # as the reward child reads it (an answer may hold U+2028, a line separator to Python)
    assert [r["generation_id"] for r in rows] == ids[2:5]  # the newest three not yet scored, oldest first
    assert rows == generations_to_score(store, 2, limit=3)
    assert rows[0]["prompt"][0] == {"role": "system", "content": 'Be "brief".\n'} and rows[0]["answer"].endswith(
        "\x01"
    )
    assert write_generations_to_score(store, 2, tmp_path / "all.jsonl", limit=None) == 5
    save_scores(store, 2, [(i, 0.0) for i in ids])
    assert (
        write_generations_to_score(store, 2, tmp_path / "none.jsonl") == 0 and not (tmp_path / "none.jsonl").exists()
    )
    store.close()

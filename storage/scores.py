"""Reward-model scores of stored generations: written after a reward run, read by the Data tab."""

from __future__ import annotations

import json
from pathlib import Path


def generations_to_score(store, reward_model_id: int) -> list[dict]:
    """Every generation this reward model has not scored yet, as (prompt messages, answer) rows."""
    with store.read() as cur:
        rows = cur.execute(
            "SELECT g.id, p.messages, g.text FROM generations g JOIN prompts p ON p.id = g.prompt_id "
            "WHERE NOT EXISTS (SELECT 1 FROM reward_scores s WHERE s.generation_id = g.id AND s.reward_model_id = ?) "
            "ORDER BY g.id",
            [reward_model_id],
        ).fetchall()
    return [
        {"generation_id": int(gid), "prompt": json.loads(messages), "answer": text} for gid, messages, text in rows
    ]


def save_scores(store, reward_model_id: int, scores: list[tuple[int, float]]) -> int:
    """Store (generation id, score) pairs for one reward model in one transaction; returns how many."""
    if not scores:
        return 0
    with store.transaction() as cur:
        cur.executemany(
            "INSERT INTO reward_scores (generation_id, reward_model_id, score) VALUES (?, ?, ?) "
            "ON CONFLICT DO UPDATE SET score = excluded.score",
            [(int(g), int(reward_model_id), float(s)) for g, s in scores],
        )
    return len(scores)


def load_score_file(path: str | Path) -> list[tuple[int, float]]:
    """The (generation_id, score) pairs of a `python -m training score` output file (.jsonl)."""
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("generation_id") is not None and row.get("score") is not None:
                pairs.append((int(row["generation_id"]), float(row["score"])))
    return pairs


def latest_reward_model(store) -> int | None:
    with store.read() as cur:
        row = cur.execute("SELECT max(reward_model_id) FROM reward_scores").fetchone()
    return int(row[0]) if row and row[0] is not None else None


def comparison_scores(store, comparison_ids: list[int]) -> dict[int, tuple[float | None, float | None]]:
    """{comparison id: (score of answer A, score of answer B)} under the newest reward model that scored anything."""
    model = latest_reward_model(store)
    if model is None or not comparison_ids:
        return {}
    with store.read() as cur:
        rows = cur.execute(
            "SELECT c.id, sa.score, sb.score FROM comparisons c "
            "LEFT JOIN reward_scores sa ON sa.generation_id = c.generation_a AND sa.reward_model_id = ? "
            "LEFT JOIN reward_scores sb ON sb.generation_id = c.generation_b AND sb.reward_model_id = ? "
            "WHERE c.id IN (SELECT unnest(?::BIGINT[]))",
            [model, model, [int(i) for i in comparison_ids]],
        ).fetchall()
    return {int(cid): (a, b) for cid, a, b in rows}

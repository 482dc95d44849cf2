"""Reward-model scores of stored generations: written after a reward run, read by the Data tab."""

from __future__ import annotations

import json
import time
from pathlib import Path

SCORE_LIMIT = 100_000  # generations a new reward model scores after its run: the newest (the Data tab shows those)
SAVE_CHUNK = 1_000  # scores per transaction: a vote waits for one at most (tens of ms under load)
SAVE_PAUSE_S = 0.002
TABLES = ("prompts", "generations", "reward_scores")  # what the unscored generations are read from (DuckDB SQL)
UPSERT = " ON CONFLICT (generation_id, reward_model_id) DO UPDATE SET score = excluded.score"


def generations_to_score(store, reward_model_id: int, limit: int | None = None) -> list[dict]:
    """The generations this reward model has not scored yet (the newest `limit`, oldest first), as (prompt
    messages, answer) rows."""
    with store.analytics(TABLES) as cur:
        rows = cur.execute(
            f"SELECT generation_id, prompt::VARCHAR, answer FROM ({_unscored(limit)})", [reward_model_id]
        ).fetchall()
    return [
        {"generation_id": int(gid), "prompt": json.loads(messages), "answer": text} for gid, messages, text in rows
    ]


def write_generations_to_score(store, reward_model_id: int, path: str | Path, limit: int | None = SCORE_LIMIT) -> int:
    """Write what generations_to_score returns to `path` as JSON Lines, straight from DuckDB (a million generations
    never become Python objects). Returns how many; an empty result writes no file."""
    path = Path(path)
    with store.analytics(TABLES) as cur:
        count = cur.execute(f"SELECT count(*) FROM ({_unscored(limit)})", [reward_model_id]).fetchall()[0][0]
        if count:
            target = str(path).replace("'", "''")
            cur.execute(f"COPY ({_unscored(limit)}) TO '{target}' (FORMAT json)", [reward_model_id])
    return int(count)


def _unscored(limit: int | None) -> str:
    """SQL of (generation_id, prompt JSON, answer) not yet scored by model `?`, the newest `limit`, by id."""
    newest = "" if limit is None else f"ORDER BY g.id DESC LIMIT {int(limit)}"
    return (
        "SELECT * FROM (SELECT g.id AS generation_id, p.messages::JSON AS prompt, g.text AS answer FROM generations g "
        "JOIN prompts p ON p.id = g.prompt_id WHERE NOT EXISTS (SELECT 1 FROM reward_scores s "
        f"WHERE s.generation_id = g.id AND s.reward_model_id = $1) {newest}) ORDER BY generation_id"
    )


def save_scores(store, reward_model_id: int, scores: list[tuple[int, float]], chunk: int = SAVE_CHUNK) -> int:
    """Store (generation id, score) pairs for one reward model (a later score of the same generation wins); returns
    how many. Written `chunk` rows per transaction, with a pause between, so votes (which need the same write lock)
    wait for one chunk at most, never for the whole file; saving again is harmless."""
    latest = {int(g): float(s) for g, s in scores}
    ids, values = list(latest), list(latest.values())
    for start in range(0, len(ids), chunk):
        with store.transaction() as cur:  # one statement, the rows as list parameters: no Arrow table to register,
            cur.execute(  # whose first scan in a process imports pyarrow.compute (~0.3 s) while holding the lock
                "INSERT INTO reward_scores (generation_id, reward_model_id, score) "
                "SELECT unnest(?::BIGINT[]), ?, unnest(?::DOUBLE[])" + UPSERT,
                [ids[start : start + chunk], int(reward_model_id), values[start : start + chunk]],
            )
        time.sleep(SAVE_PAUSE_S)  # let a waiting vote take the write lock before the next chunk
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

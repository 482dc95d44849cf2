"""Version lifecycle and the promotions log (migration m004_arena): the SQL of the arena, nothing else.

`model_versions.status` of a policy: 'candidate' (trained, judged against the serving version before it may serve),
'serving' (exactly one), 'retired' (served before, or trained before the arena existed), 'rejected' (judged clearly
worse than the serving version). Every change of the served version is one `promotions` row: which version, from
which, how ('gate' | 'auto' | 'override' | 'rollback'), the evidence (JSON) and who did it.
"""

from __future__ import annotations

import json
from pathlib import Path

STATUSES = ("candidate", "serving", "retired", "rejected")
PROMOTION_KINDS = ("gate", "auto", "override", "rollback")


def serve(store, version_id: int, from_version: int | None, kind: str, evidence: dict, actor: str | None) -> int:
    """Mark `version_id` serving (the one serving before retires) and log it, in one transaction; the row id."""
    if kind not in PROMOTION_KINDS:
        raise ValueError(f"a promotion is one of {', '.join(PROMOTION_KINDS)}, not {kind!r}")

    # Its own transaction under the "promotion" lock: on PostgreSQL two app processes promoting at once would each
    # retire only the version serving when its UPDATE began, and leave two serving.
    with store.transaction(lock="promotion") as cur:
        mark_serving(cur, version_id)
        return int(
            cur.execute(
                "INSERT INTO promotions (id, version_id, from_version, kind, evidence, actor) "
                "VALUES (nextval('promotions_id_seq'), ?, ?, ?, ?, ?) RETURNING id",
                [int(version_id), from_version, kind, json.dumps(evidence), actor],
            ).fetchone()[0]
        )


def mark_serving(cur, version_id: int) -> None:
    cur.execute(
        "UPDATE model_versions SET status = 'retired' WHERE kind = 'policy' AND status = 'serving' AND id <> ?",
        [int(version_id)],
    )
    cur.execute("UPDATE model_versions SET status = 'serving' WHERE id = ?", [int(version_id)])


def set_status(store, version_id: int, status: str, only_if: str | None = None) -> None:
    """`only_if`: change it only from that status (the arena rejects a candidate, not one an admin served since)."""
    if status not in STATUSES:
        raise ValueError(f"a version status is one of {', '.join(STATUSES)}, not {status!r}")
    sql = "UPDATE model_versions SET status = ? WHERE id = ?" + (" AND status = ?" if only_if else "")
    store.write(lambda cur: cur.execute(sql, [status, int(version_id), *([only_if] if only_if else [])]))


def version_status(store, version_id: int) -> str | None:
    with store.read() as cur:
        row = cur.execute("SELECT status FROM model_versions WHERE id = ?", [int(version_id)]).fetchone()
    return row[0] if row else None


def candidates(store) -> list[dict]:
    """Policy candidates with an adapter, newest first: [{"id", "parent_id", "adapter_path"}]. Only those trained on
    the base model the app runs (version 0's base_model, by `same_base`): an adapter does not fit another base."""
    with store.read() as cur:
        base = cur.execute("SELECT base_model FROM model_versions WHERE id = 0").fetchone()
        rows = cur.execute(
            "SELECT id, parent_id, adapter_path, base_model FROM model_versions WHERE kind = 'policy' "
            "AND status = 'candidate' AND adapter_path IS NOT NULL ORDER BY id DESC"
        ).fetchall()
    return [
        {"id": int(r[0]), "parent_id": r[1], "adapter_path": r[2]} for r in rows if base and same_base(r[3], base[0])
    ]


def same_base(a: str | None, b: str | None) -> bool:
    """One base model: the same name, or the same folder written two ways (--model ./m, then --model m)."""
    if not a or not b:
        return False
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def promotions(store, limit: int = 50) -> list[dict]:
    """The newest promotions first, evidence decoded."""
    with store.read() as cur:
        cur.execute(
            "SELECT id, version_id, from_version, kind, evidence, actor, created_at FROM promotions "
            "ORDER BY id DESC LIMIT ?",
            [int(limit)],
        )
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    for row in rows:
        row["evidence"] = json.loads(row["evidence"]) if row["evidence"] else {}
    return rows


def lineage(store) -> list[dict]:
    """Every policy version with where it came from: id, status, parent, run, method, data size (comparisons it
    was trained on), notes, created_at. Oldest first."""
    with store.read() as cur:
        cur.execute(
            """SELECT v.id, v.status, v.parent_id, v.run_id, r.method,
                      coalesce(json_array_length(v.trained_on), 0) AS trained_on, v.notes, v.created_at
               FROM model_versions v LEFT JOIN training_runs r ON r.id = v.run_id
               WHERE v.kind = 'policy' ORDER BY v.id"""
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

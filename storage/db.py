"""The DuckDB store: one connection per process, a fresh cursor per call, group-committed writes.

Many request threads write at once; storage/commit.py runs every queued write in one transaction (group commit),
so 32 threads cost about one commit per batch instead of one each, and a write returns only after its COMMIT.
A database that cannot be opened (locked by another process, a read-only path, a full disk) is one StoreOpenError.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb

from storage.commit import GroupCommit, Pending
from storage.errors import StoreOpenError
from storage.migrations import apply_migrations
from storage.postgres import PgConnections, SessionLock, duckdb_snapshot, is_postgres
from storage.rows import (  # noqa: F401 - the row checks, importable from here as before
    CHOICES,
    MAX_FIELD_CHARS,
    ROLES,
    annotator_name,
    canonical_messages,
    check_judgement,
    prompt_hash,
)  # fmt: skip


def default_db_path() -> str:
    return os.environ.get("PREFLOOP_DB", "data/prefloop.duckdb")


CLOSE_TRIES = 500  # × 10 ms: how long close() waits for another thread's query on the store
OWN_WINDOW = 100_000  # ids: a person's own recent judgements are looked for among the newest this many (cheap at 1M)
COMPARISON_COLUMNS = ("pair_id", "prompt_id", "generation_a", "generation_b", "annotator", "choice", "rationale",
                      "edited_answer", "time_spent_s", "source", "supersedes", "dedupe_key")  # fmt: skip
COMPARISON_TYPES = {"id": "BIGINT", "pair_id": "BIGINT", "prompt_id": "BIGINT", "generation_a": "BIGINT",
                    "generation_b": "BIGINT", "annotator": "VARCHAR", "choice": "VARCHAR", "rationale": "VARCHAR",
                    "edited_answer": "VARCHAR", "time_spent_s": "DOUBLE", "source": "VARCHAR", "supersedes": "BIGINT",
                    "dedupe_key": "VARCHAR"}  # fmt: skip


class Store:
    def __init__(self, path: str | Path | None = None):
        path = str(path if path is not None else default_db_path())
        self.path = path
        self.dialect = "postgres" if is_postgres(path) else "duckdb"  # storage/postgres.py: several app processes
        try:
            if self.dialect == "postgres":
                self._con = PgConnections(path)
            else:
                if path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._con = duckdb.connect(path)
        except Exception as exc:  # duckdb.Error, OSError, psycopg.Error: one line naming the store
            raise StoreOpenError(path, exc) from None
        self._write_lock = threading.Lock()
        self._session_locks: dict[str, SessionLock] = {}
        self._commits = GroupCommit(lambda: self._con.cursor(), self._write_lock, _insert_comparison_rows)
        try:
            apply_migrations(self._con)
        except Exception as exc:  # e.g. the disk filled up while a new file was being set up
            self._con.close()
            raise StoreOpenError(path, exc) from None

    def close(self, checkpoint: bool = True) -> None:
        """`checkpoint=False`: a DuckDB file keeps its WAL for the next opener instead of checkpointing at close (after
        a bulk import that checkpoint rewrites the unique indexes: 1.5–2.5 s at 1M comparisons, for a read)."""
        for lock in self._session_locks.values():
            lock.release()
        self._commits.close()
        with self._write_lock:
            if not checkpoint and self.dialect == "duckdb":
                self._con.execute("PRAGMA disable_checkpoint_on_shutdown")
            for _ in range(CLOSE_TRIES):
                try:
                    return self._con.close()
                except duckdb.ResourceInUseException:  # another thread opens or uses a cursor now: let it end
                    time.sleep(0.01)
            self._con.close()

    # ---- cursors and transactions -------------------------------------------------------------------------
    @contextlib.contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self._con.cursor()
        try:
            yield cur
        finally:
            cur.close()

    def hold_lock(self, name: str) -> bool:
        """Whether this process holds lock `name` ("runner": it runs the training queue), taking it when free.
        A DuckDB file has one app process, which always does; on PostgreSQL the first process to ask holds it until
        it ends (storage/postgres.py SessionLock)."""
        if self.dialect == "duckdb":
            return True
        lock = self._session_locks.setdefault(name, SessionLock(self._con, name))
        return lock.held()

    @contextlib.contextmanager
    def analytics(self, tables: tuple[str, ...]) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB cursor for exports and analytics over `tables`: the file itself, or on PostgreSQL a DuckDB copy
        of those tables taken at one moment (storage/postgres.py duckdb_snapshot)."""
        if self.dialect == "duckdb":
            with self.read() as cur:
                yield cur
            return
        con = duckdb_snapshot(self._con, tables)
        try:
            yield con.cursor()
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """One explicit transaction under the write lock: everything inside commits together or not at all.
        `lock` ("pairs"): on PostgreSQL, also hold that advisory lock, so other app processes wait for it too."""
        with self._write_lock:
            cur = self._con.cursor()
            try:
                cur.execute("BEGIN")  # inside the try: a failed lock wait must still roll back and give the cursor
                if lock and self.dialect == "postgres":  # (a pooled connection) back
                    cur.lock(lock)
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):  # a failed COMMIT may have ended it: keep the first error
                    cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()

    def write(self, fn: Callable[[Any], Any], cur=None, row: list | None = None):
        """Run fn(cursor) in a committed transaction (group-committed with concurrent writers); its result."""
        if cur is not None:  # already inside the caller's transaction
            return fn(cur)
        return self._commits.write(fn, row)

    # ---- prompts, generations, annotators -----------------------------------------------------------------
    def add_prompt(self, messages: str | list[dict], source: str, cur=None) -> int:
        messages = canonical_messages(messages)
        digest = prompt_hash(messages)

        def insert(c) -> int:
            found = c.execute("SELECT id FROM prompts WHERE hash = ?", [digest]).fetchone()
            if found:
                return int(found[0])
            c.execute(
                "INSERT INTO prompts (id, hash, messages, text, source) "
                "VALUES (nextval('prompts_id_seq'), ?, ?, ?, ?) RETURNING id",
                [digest, json.dumps(messages, ensure_ascii=False), messages[-1]["content"], source],
            )
            return int(c.fetchone()[0])

        return self.write(insert, cur)

    def add_generation(
        self,
        prompt_id: int,
        text: str,
        *,
        model_version_id: int | None = None,
        model_name: str | None = None,
        params: dict | None = None,
        token_count: int | None = None,
        latency_ms: float | None = None,
        cur=None,
    ) -> int:
        if not isinstance(text, str):
            raise ValueError("a generation's text must be a string")
        if len(text) > MAX_FIELD_CHARS:
            raise ValueError(f"an answer is over {MAX_FIELD_CHARS:,} characters")
        values = [prompt_id, model_version_id, model_name, json.dumps(params or {}), text, token_count, latency_ms]

        def insert(c) -> int:
            c.execute(
                "INSERT INTO generations (id, prompt_id, model_version_id, model_name, params, text, token_count, "
                "latency_ms) VALUES (nextval('generations_id_seq'), ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                values,
            )
            return int(c.fetchone()[0])

        return self.write(insert, cur)

    def ensure_annotator(self, name: str, cur=None) -> None:
        name = annotator_name(name)
        self.write(lambda c: c.execute("INSERT INTO annotators (name) VALUES (?) ON CONFLICT DO NOTHING", [name]), cur)

    # ---- comparisons --------------------------------------------------------------------------------------
    def add_comparison(
        self,
        *,
        prompt_id: int,
        generation_a: int,
        generation_b: int,
        annotator: str,
        choice: str,
        pair_id: int | None = None,
        rationale: str | None = None,
        edited_answer: str | None = None,
        time_spent_s: float | None = None,
        source: str = "ui",
        supersedes: int | None = None,
        dedupe_key: str | None = None,
        cur=None,
    ) -> int | None:
        """Append a judgement. Returns its id, or None when `dedupe_key` was already stored (a re-import)."""
        annotator = annotator_name(annotator)
        check_judgement(choice, rationale, edited_answer)
        values = [
            pair_id,
            prompt_id,
            generation_a,
            generation_b,
            annotator,
            choice,
            rationale,
            edited_answer,
            time_spent_s,
            source,
            supersedes,
            dedupe_key,
        ]

        def insert(c) -> int | None:
            if dedupe_key and c.execute("SELECT 1 FROM comparisons WHERE dedupe_key = ?", [dedupe_key]).fetchone():
                return None
            return _insert_comparison_rows(c, [Pending(insert, values)]).popitem()[1]

        bulk = dedupe_key is None and cur is None  # plain votes join the next multi-row INSERT
        return self.write(insert, cur, row=values if bulk else None)

    def undo_comparison(self, comparison_id: int, annotator: str, cur=None) -> int:
        """Append an 'undone' row superseding the comparison, a judgement or a skip (the table stays append-only)."""
        annotator = annotator_name(annotator)

        def insert(c) -> int:
            row = c.execute(
                "SELECT pair_id, prompt_id, generation_a, generation_b FROM comparisons c WHERE id = ? "
                "AND annotator = ? AND choice <> 'undone' "
                "AND NOT EXISTS (SELECT 1 FROM comparisons s WHERE s.supersedes = c.id)",
                [comparison_id, annotator],
            ).fetchone()
            if row is None:
                raise ValueError(f"comparison {comparison_id} is not an active judgement of {annotator}")
            c.execute(
                "INSERT INTO comparisons (id, pair_id, prompt_id, generation_a, generation_b, annotator, choice, "
                "source, supersedes) VALUES (nextval('comparisons_id_seq'), ?, ?, ?, ?, ?, 'undone', 'undo', ?) "
                "RETURNING id",
                [*row, annotator, comparison_id],
            )
            return int(c.fetchone()[0])

        return self.write(insert, cur)

    # ---- model versions and settings ----------------------------------------------------------------------
    def add_version(
        self,
        *,
        kind: str = "policy",
        base_model: str,
        adapter_path: str | None = None,
        parent_id: int | None = None,
        run_id: int | None = None,
        notes: str | None = None,
        metrics: dict | None = None,
        trained_on: list[int] | None = None,
        reward_model_id: int | None = None,
    ) -> int:
        if kind not in ("policy", "reward"):
            raise ValueError(f"a model version is a policy or a reward model, not {kind!r}")
        values = [
            kind,
            base_model,
            adapter_path,
            parent_id,
            run_id,
            notes,
            json.dumps(metrics or {}),
            json.dumps(trained_on or []),
            reward_model_id,
        ]

        def insert(c) -> int:
            c.execute(
                "INSERT INTO model_versions (id, kind, base_model, adapter_path, parent_id, run_id, notes, metrics, "
                "trained_on, reward_model_id) VALUES (nextval('model_versions_id_seq'), ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "RETURNING id",
                values,
            )
            return int(c.fetchone()[0])

        return self.write(insert)

    def get_version(self, version_id: int) -> dict | None:
        rows = self._dicts("SELECT * FROM model_versions WHERE id = ?", [version_id])
        return _decode_version(rows[0]) if rows else None

    def list_versions(self, kind: str = "policy") -> list[dict]:
        return [
            _decode_version(r) for r in self._dicts("SELECT * FROM model_versions WHERE kind = ? ORDER BY id", [kind])
        ]

    def set_base_model(self, base_model: str) -> None:
        self.write(lambda c: c.execute("UPDATE model_versions SET base_model = ? WHERE id = 0", [base_model]))

    def get_setting(self, key: str) -> str | None:
        with self.read() as cur:
            row = cur.execute("SELECT value FROM app_settings WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        self.write(
            lambda c: c.execute(
                "INSERT INTO app_settings VALUES (?, ?, now()) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now()",
                [key, value],
            )
        )

    # ---- views --------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Rows per table and effective comparisons per choice, annotator, source and model version (kept counts:
        storage/tallies.py)."""
        from storage.tallies import stats

        return stats(self)

    def recent_comparisons(self, limit: int = 50, annotator: str | None = None) -> list[dict]:
        """The newest effective comparisons (of `annotator` only, when given: among the newest OWN_WINDOW) with
        their texts. Ids grow, so they are looked for among the newest rows first (a window that widens tenfold
        until it holds `limit` or everything), never by sorting the table."""
        limit, span, mine = int(limit), max(20 * int(limit), 1000), annotator is not None
        with self.read() as cur:
            high = cur.execute("SELECT coalesce(max(id), 0) FROM comparisons").fetchone()[0]
            while True:
                sql = "SELECT id FROM effective_comparisons WHERE id > ? AND (? OR annotator = ?) ORDER BY id DESC "
                sql += "LIMIT ?"
                ids = [row[0] for row in cur.execute(sql, [high - span, not mine, annotator, limit]).fetchall()]
                if len(ids) >= limit or high - span <= 0 or (mine and span >= OWN_WINDOW):
                    break
                span *= 10
        return self._dicts(
            "SELECT c.id, c.created_at, c.annotator, c.choice, p.text AS prompt, ga.text AS answer_a, "
            "gb.text AS answer_b, c.rationale, c.edited_answer AS edited, c.generation_a, c.generation_b "
            "FROM comparisons c JOIN prompts p ON p.id = c.prompt_id "
            "JOIN generations ga ON ga.id = c.generation_a JOIN generations gb ON gb.id = c.generation_b "
            "WHERE c.id IN (SELECT unnest(?::BIGINT[])) ORDER BY c.id DESC",
            [ids],
        )

    def _dicts(self, sql: str, params: list | None = None) -> list[dict]:
        with self.read() as cur:
            cur.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def insert_comparisons(cur, rows: list[list], annotators: list[str] | None = None) -> list[int]:
    """One INSERT of comparison rows (values in COMPARISON_COLUMNS order) inside the caller's transaction, each column
    passed as one list: 16 rows insert in ≈ 1.5 ms, against ≈ 5 ms as a VALUES list of 208 parameters (DuckDB plans
    every one). Returns the new ids in row order. `annotators`: the names to make sure exist first (default: every
    row's annotator; a caller that knows some exist already may pass fewer)."""
    if not rows:
        return []
    names = sorted({row[4] for row in rows}) if annotators is None else sorted(set(annotators))
    if names:
        cur.execute(
            f"INSERT INTO annotators (name) VALUES {', '.join(['(?)'] * len(names))} ON CONFLICT DO NOTHING", names
        )
    sql = "SELECT nextval('comparisons_id_seq') FROM generate_series(1, ?)"
    ids = [int(r[0]) for r in cur.execute(sql, [len(rows)]).fetchall()]
    fields = ("id", *COMPARISON_COLUMNS)  # each passed as one list of its COMPARISON_TYPES type: a list holds one
    columns = [  # type, so a DOUBLE column's values all go as floats (3 and 2.5 seconds alike)
        [None if value is None else float(value) for value in column] if COMPARISON_TYPES[name] == "DOUBLE" else column
        for name, column in zip(fields, [ids, *(list(column) for column in zip(*rows, strict=True))], strict=True)
    ]
    values = ", ".join(f"unnest(?::{COMPARISON_TYPES[name]}[])" for name in fields)
    cur.execute(f"INSERT INTO comparisons ({', '.join(fields)}) SELECT {values}", columns)
    return ids


def _insert_comparison_rows(cur, items: list[Pending]) -> dict[int, int]:
    """The queued plain votes of one group commit, in one INSERT. Returns {id(item): comparison id}."""
    ids = insert_comparisons(cur, [item.row for item in items])
    return {id(item): new_id for new_id, item in zip(ids, items, strict=True)}


def _decode_version(row: dict) -> dict:
    for key in ("metrics", "trained_on"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    return row

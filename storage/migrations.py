"""Schema changes as numbered functions, applied in order on open and recorded by name in `migrations`.

Never edit a migration that has shipped: add the next one. Tests apply MIGRATIONS[:k] to a file, reopen it
with the full list, and check that nothing is lost.
"""

from __future__ import annotations

from collections.abc import Callable

from storage.postgres import LOCKS


def m001_initial(cur) -> None:
    for table in ("prompts", "generations", "pairs", "comparisons", "training_runs"):
        cur.execute(f"CREATE SEQUENCE {table}_id_seq START 1")
    cur.execute("CREATE SEQUENCE model_versions_id_seq START 1")  # version 0 is the base, inserted below
    cur.execute(
        """CREATE TABLE prompts (
            id BIGINT PRIMARY KEY, hash VARCHAR NOT NULL UNIQUE, messages JSON NOT NULL, text VARCHAR NOT NULL,
            source VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL DEFAULT now())"""
    )
    cur.execute("CREATE TABLE annotators (name VARCHAR PRIMARY KEY, created_at TIMESTAMP NOT NULL DEFAULT now())")
    cur.execute(
        """CREATE TABLE model_versions (
            id INTEGER PRIMARY KEY, kind VARCHAR NOT NULL DEFAULT 'policy', base_model VARCHAR NOT NULL,
            adapter_path VARCHAR, parent_id INTEGER, run_id INTEGER, created_at TIMESTAMP NOT NULL DEFAULT now(),
            notes VARCHAR, metrics JSON, trained_on JSON, reward_model_id INTEGER)"""
    )
    cur.execute("INSERT INTO model_versions (id, kind, base_model, notes) VALUES (0, 'policy', 'bundled', 'base')")
    cur.execute(
        """CREATE TABLE generations (
            id BIGINT PRIMARY KEY, prompt_id BIGINT NOT NULL, model_version_id INTEGER, model_name VARCHAR,
            params JSON, text VARCHAR NOT NULL, token_count INTEGER, latency_ms DOUBLE,
            created_at TIMESTAMP NOT NULL DEFAULT now())"""
    )
    cur.execute(
        """CREATE TABLE pairs (
            id BIGINT PRIMARY KEY, prompt_id BIGINT NOT NULL, strategy VARCHAR NOT NULL, generation_a BIGINT NOT NULL,
            generation_b BIGINT NOT NULL, status VARCHAR NOT NULL DEFAULT 'ready', leased_to VARCHAR,
            lease_expires TIMESTAMP, created_at TIMESTAMP NOT NULL DEFAULT now())"""
    )
    cur.execute(
        """CREATE TABLE comparisons (
            id BIGINT PRIMARY KEY, pair_id BIGINT, prompt_id BIGINT NOT NULL, generation_a BIGINT NOT NULL,
            generation_b BIGINT NOT NULL, annotator VARCHAR NOT NULL, choice VARCHAR NOT NULL, rationale VARCHAR,
            edited_answer VARCHAR, time_spent_s DOUBLE, source VARCHAR NOT NULL, supersedes BIGINT,
            dedupe_key VARCHAR UNIQUE, created_at TIMESTAMP NOT NULL DEFAULT now())"""
    )
    cur.execute(
        """CREATE TABLE training_runs (
            id INTEGER PRIMARY KEY, method VARCHAR NOT NULL, status VARCHAR NOT NULL, config JSON, run_dir VARCHAR,
            snapshot_rows INTEGER, pid INTEGER, parent_version INTEGER, result_version INTEGER,
            created_at TIMESTAMP NOT NULL DEFAULT now(), started_at TIMESTAMP, finished_at TIMESTAMP,
            metrics JSON, error VARCHAR)"""
    )
    cur.execute(
        """CREATE VIEW effective_comparisons AS
            SELECT c.* FROM comparisons c
            WHERE c.choice IN ('A', 'B', 'tie', 'both_bad')
              AND NOT EXISTS (SELECT 1 FROM comparisons later WHERE later.supersedes = c.id)"""
    )


def m002_settings(cur) -> None:
    """Small key/value settings that must survive a restart (e.g. which model version is being served)."""
    cur.execute("CREATE TABLE app_settings (key VARCHAR PRIMARY KEY, value VARCHAR, updated_at TIMESTAMP)")


def m003_reward_scores(cur) -> None:
    """Scores a reward model gave stored generations (filled after a reward run; shown in the Data tab)."""
    cur.execute(
        """CREATE TABLE reward_scores (
            generation_id BIGINT NOT NULL, reward_model_id INTEGER NOT NULL, score DOUBLE NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT now(), PRIMARY KEY (generation_id, reward_model_id))"""
    )


def m005_effective_by_key(cur) -> None:
    """effective_comparisons finds superseded rows by key: one anti-join against the few rows that supersede another,
    instead of a NOT EXISTS per row, which DuckDB ran by materialising every column of every comparison (0.7 s to
    count a million; now a few ms, and a lookup by id or annotator stays a lookup)."""
    if dialect(cur) == "postgres":  # PostgreSQL plans the NOT EXISTS as an anti-join itself (no ANTI JOIN syntax)
        return
    cur.execute(
        """CREATE OR REPLACE VIEW effective_comparisons AS
            SELECT c.* FROM comparisons c
            ANTI JOIN (SELECT supersedes FROM comparisons WHERE supersedes IS NOT NULL) later
              ON later.supersedes = c.id
            WHERE c.choice IN ('A', 'B', 'tie', 'both_bad')"""
    )


def m006_arena(cur) -> None:
    """The arena: a policy version's lifecycle (`status`: a new one is a 'candidate' judged against the serving one
    before it may serve; 'serving', 'retired' once something else serves, 'rejected' when judged clearly worse) and
    one `promotions` row per change of the served version, with the evidence it was made on."""
    cur.execute("ALTER TABLE model_versions ADD COLUMN status VARCHAR DEFAULT 'candidate'")
    as_int = "try_cast(value AS INTEGER)"
    if dialect(cur) == "postgres":
        as_int = "CASE WHEN value ~ '^[0-9]{1,9}$' THEN value::INTEGER END"
    cur.execute(
        f"""UPDATE model_versions SET status = CASE WHEN id = coalesce((SELECT {as_int}
                FROM app_settings WHERE key = 'active_version'), 0) THEN 'serving' ELSE 'retired' END
            WHERE kind = 'policy'"""
    )  # versions from before the arena were already served or servable: none waits for judgement
    cur.execute("UPDATE model_versions SET status = NULL WHERE kind <> 'policy'")
    cur.execute("CREATE SEQUENCE promotions_id_seq START 1")
    cur.execute(
        """CREATE TABLE promotions (
            id INTEGER PRIMARY KEY, version_id INTEGER NOT NULL, from_version INTEGER, kind VARCHAR NOT NULL,
            evidence JSON, actor VARCHAR, created_at TIMESTAMP NOT NULL DEFAULT now())"""
    )  # kind: 'gate' (an admin promoted a candidate that passed), 'auto', 'override', 'rollback'


def m007_postgres_indexes(cur) -> None:
    """On PostgreSQL, the indexes the click path looks rows up by (DuckDB scans its column segments instead, and
    an index there would slow every insert)."""
    if dialect(cur) != "postgres":
        return
    for table, columns in (
        ("pairs", "status, id"),
        ("pairs", "leased_to"),
        ("comparisons", "pair_id"),
        ("comparisons", "supersedes"),
        ("comparisons", "annotator, id"),
        ("comparisons", "prompt_id"),
        ("generations", "prompt_id"),
    ):
        name = f"{table}_{columns.replace(', ', '_')}_idx"
        cur.execute(f"CREATE INDEX {name} ON {table} ({columns})")


def m008_keys_without_unique_index(cur) -> None:
    """On DuckDB, prompts.hash and comparisons.dedupe_key lose their UNIQUE constraints (the tables are rebuilt: DuckDB
    cannot drop a constraint). DuckDB rewrote those two ART indexes whole at every checkpoint, so each bulk import's
    commit grew with the store (1 s of a 100,000-row import at a million comparisons; duckdb/duckdb#24848). Nothing
    relied on them to refuse a row: every writer looks keys up first under the store's one write lock (the importers
    by join, Store.add_prompt and add_comparison by key). PostgreSQL, with several writing processes, keeps them."""
    if dialect(cur) == "postgres":
        return
    tables = {
        "prompts": """id BIGINT PRIMARY KEY, hash VARCHAR NOT NULL, messages JSON NOT NULL, text VARCHAR NOT NULL,
            source VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL DEFAULT now()""",
        "comparisons": """id BIGINT PRIMARY KEY, pair_id BIGINT, prompt_id BIGINT NOT NULL,
            generation_a BIGINT NOT NULL, generation_b BIGINT NOT NULL, annotator VARCHAR NOT NULL,
            choice VARCHAR NOT NULL, rationale VARCHAR, edited_answer VARCHAR, time_spent_s DOUBLE,
            source VARCHAR NOT NULL, supersedes BIGINT, dedupe_key VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT now()""",
    }  # the columns of m001_initial, which no later migration changed
    for table, columns in tables.items():
        cur.execute(f"CREATE TABLE {table}_rebuilt ({columns})")
        cur.execute(f"INSERT INTO {table}_rebuilt SELECT * FROM {table}")  # in the same order
        cur.execute(f"DROP TABLE {table}")
        cur.execute(f"ALTER TABLE {table}_rebuilt RENAME TO {table}")


MIGRATIONS: list[Callable] = [
    m001_initial,
    m002_settings,
    m003_reward_scores,
    m005_effective_by_key,
    m006_arena,
    m007_postgres_indexes,
    m008_keys_without_unique_index,
]


def dialect(cur) -> str:
    """ "postgres" for a storage/postgres.py cursor, else "duckdb"."""
    return getattr(cur, "dialect", "duckdb")


def apply_migrations(con, migrations: list[Callable] | None = None) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction. Returns the names applied now.

    A migration is known by its function name (recorded in `migrations.name`), not by its place in the list,
    so reordering or removing an entry can never re-run or skip another one.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    names = [m.__name__ for m in migrations]
    if len(set(names)) != len(names):
        raise ValueError("two migrations share a name")
    cur = con.cursor()
    try:
        if dialect(cur) == "postgres":  # two processes starting at once: one migrates, the other then finds it done
            cur.execute("SELECT pg_advisory_lock(?)", [LOCKS["migrations"]])
        cur.execute(
            "CREATE TABLE IF NOT EXISTS migrations "
            "(id INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP)"
        )
        done = {row[0] for row in cur.execute("SELECT name FROM migrations").fetchall()}
        applied = []
        for migration in migrations:
            if migration.__name__ in done:
                continue
            cur.execute("BEGIN")
            try:
                migration(cur)
                cur.execute(
                    "INSERT INTO migrations SELECT coalesce(max(id), 0) + 1, ?, now() FROM migrations",
                    [migration.__name__],
                )
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise
            applied.append(migration.__name__)
        return applied
    finally:
        if dialect(cur) == "postgres":
            cur.execute("SELECT pg_advisory_unlock_all()")
            cur.close()

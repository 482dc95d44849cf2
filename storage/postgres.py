"""PostgreSQL as the store's engine, for several app processes on one database (psycopg 3).

`--db postgresql://user@host/db` gives a Store whose cursors (`PgCursor`) speak the same SQL as DuckDB's: the
store's SQL is written in the subset both understand (`x = ANY(?)`, `generate_series`, `FILTER (WHERE ...)`), and
`translate` rewrites what remains (`?` placeholders, `DOUBLE`). Connections come from a small pool, in autocommit
mode, so `BEGIN` / `COMMIT` work as they do on a DuckDB cursor; JSON columns come back as text, timestamps as naive
UTC. Analytics (exports, ratings) run in DuckDB on a snapshot of the tables they read (`duckdb_snapshot`).

Across processes: a transaction that hands out or changes pairs holds an advisory transaction lock (`lock`), so two
processes never lease one pair twice; the training queue belongs to whichever process holds a session advisory lock
(`SessionLock`); migrations run under one too, so two processes starting together migrate once.
"""

from __future__ import annotations

import functools
import re
import tempfile
import threading
import time
from pathlib import Path

PREFIXES = ("postgresql://", "postgres://")
POOL_SIZE = 16  # idle connections kept; more are opened while needed (a burst of request threads)
IDLE_CHECK_SECONDS = 5.0  # a pooled connection idle longer is checked before use (one round trip)
CSV_MAX_LINE = 1 << 30  # bytes of one CSV row DuckDB reads in duckdb_snapshot (its default, 2 MB, is too small)
LOCKS = {"migrations": 7101, "pairs": 7102, "runner": 7103, "promotion": 7104}  # advisory lock keys (any fixed bigint)


def is_postgres(path: str) -> bool:
    return str(path).startswith(PREFIXES)


@functools.lru_cache(maxsize=4096)
def translate(sql: str, with_params: bool) -> str:
    """DuckDB-flavoured SQL as PostgreSQL takes it: `?` → `%s` (outside quotes), `%` doubled when parameters are
    passed (psycopg reads `%` as a placeholder then), DOUBLE → DOUBLE PRECISION."""
    out = []
    for i, piece in enumerate(re.split(r"('(?:[^']|'')*')", sql)):  # odd pieces: string literals, kept as they are
        if i % 2:
            out.append(piece.replace("%", "%%") if with_params else piece)
            continue
        if with_params:
            piece = piece.replace("%", "%%").replace("?", "%s")
        piece = re.sub(r"\bDOUBLE\b(?!\s+PRECISION)", "DOUBLE PRECISION", piece)
        out.append(piece)
    return "".join(out)


class PgConnections:
    """A pool of autocommit connections to one database; `cursor()` lends one until the cursor is closed."""

    dialect = "postgres"

    def __init__(self, dsn: str):
        import psycopg

        self.dsn, self._psycopg = dsn, psycopg
        self._idle: list = []
        self._lock = threading.Lock()
        self._closed = False
        self.give(self._connect())  # fail now, with the reason, if the server cannot be reached

    def _connect(self):
        from psycopg.types.string import TextLoader

        conn = self._psycopg.connect(  # ISO dates whatever the DateStyle: DuckDB reads them, tallies sort them
            self.dsn, autocommit=True, options="-c TimeZone=UTC -c DateStyle=ISO", application_name="prefloop"
        )
        for json_type in ("json", "jsonb"):  # JSON columns as text, as DuckDB gives them
            conn.adapters.register_loader(json_type, TextLoader)
        return conn

    def take(self):
        """An idle connection (one idle for IDLE_CHECK_SECONDS is checked first: after a server restart every pooled
        connection is dead, and psycopg notices only on use, which failed a vote per dead one), else a new one."""
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the store is closed")
                conn, since = self._idle.pop() if self._idle else (None, 0.0)
            if conn is None:
                return self._connect()
            if time.monotonic() - since < IDLE_CHECK_SECONDS or self._alive(conn):
                return conn

    @staticmethod
    def _alive(conn) -> bool:
        try:
            conn.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - any failure: this connection is not reused
            conn.close()
            return False

    def give(self, conn) -> None:
        """Back to the pool: a connection left inside a transaction is rolled back; a broken one is dropped."""
        from psycopg.pq import TransactionStatus

        try:
            if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                conn.rollback()
        except Exception:  # noqa: BLE001 - a connection that cannot roll back is not reused
            conn.close()
        with self._lock:
            if conn.closed or conn.broken or self._closed or len(self._idle) >= POOL_SIZE:
                conn.close()
            else:
                self._idle.append((conn, time.monotonic()))

    def cursor(self) -> PgCursor:
        return PgCursor(self)

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for conn, _ in idle:
            conn.close()


class PgCursor:
    """The DuckDB cursor calls the store uses (execute → self, fetchone, fetchall, description, close), on a pooled
    PostgreSQL connection that goes back to the pool at close()."""

    dialect = "postgres"

    def __init__(self, connections: PgConnections):
        self._connections = connections
        self.connection = connections.take()
        self._cur = self.connection.cursor()

    def execute(self, sql: str, params=None) -> PgCursor:
        with_params = params is not None
        self._cur.execute(translate(sql, with_params), _adapt(params) if with_params else None)
        return self

    def executemany(self, sql: str, rows) -> PgCursor:
        self._cur.executemany(translate(sql, True), [_adapt(row) for row in rows])
        return self

    def fetchone(self):
        return self._cur.fetchone()

    def fetchall(self) -> list:
        return self._cur.fetchall()

    def fetchmany(self, size: int) -> list:
        return self._cur.fetchmany(size)

    @property
    def description(self):
        return [(column.name, column.type_code) for column in self._cur.description or []]

    def lock(self, name: str) -> None:
        """Hold advisory lock `name` until this transaction ends (other processes' holders wait)."""
        self._cur.execute("SELECT pg_advisory_xact_lock(%s)", [LOCKS[name]])

    def close(self) -> None:
        if self.connection is None:
            return
        try:
            self._cur.close()
        finally:
            conn, self.connection = self.connection, None
            self._connections.give(conn)

    def __enter__(self) -> PgCursor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NUL_STAND_IN = "\ufffd"  # PostgreSQL text cannot hold NUL, which a model can emit: stored as U+FFFD instead


def _adapt(params):
    """Parameters as psycopg takes them: lists stay lists (arrays), tuples become lists, numpy scalars plain, and a
    NUL character in a string becomes NUL_STAND_IN (DuckDB stores it as it is)."""
    if isinstance(params, dict):
        return {key: _value(value) for key, value in params.items()}
    return [_value(value) for value in params]


def _value(value):
    if isinstance(value, str):
        return value.replace("\x00", NUL_STAND_IN) if "\x00" in value else value
    if isinstance(value, (tuple, list)):
        return [_value(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, bytes):  # numpy scalar (str and lists are handled above)
        return value.item()
    return value


class SessionLock:
    """An advisory lock held by this process for as long as it lives (its own connection), taken without waiting:
    `held()` is True once this process has it. When the process dies, PostgreSQL ends the session and frees it."""

    def __init__(self, connections: PgConnections, name: str):
        self._connections, self._key = connections, LOCKS[name]
        self._conn = None
        self._lock = threading.Lock()

    def held(self) -> bool:
        with self._lock:
            if self._conn is not None and self._still_held():
                return True
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            conn = self._connections._connect()
            if conn.execute("SELECT pg_try_advisory_lock(%s)", [self._key]).fetchone()[0]:
                self._conn = conn
                return True
            conn.close()
            return False

    def _still_held(self) -> bool:
        """Asked of the server: psycopg marks a connection the server dropped (a restart, an idle timeout) closed only
        once it is used, and the lock went with that session — another process may hold it now."""
        try:
            return bool(
                self._conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' "
                    "AND objid::bigint = %s AND granted",
                    [self._key],
                ).fetchone()[0]
            )
        except Exception:  # noqa: BLE001 - a dead connection holds nothing
            return False

    def release(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# ---- analytics: a DuckDB copy of the tables a query reads -----------------------------------------------------
def duckdb_snapshot(connections: PgConnections, tables: tuple[str, ...]):
    """An in-memory DuckDB database with the store's schema (its migrations) and the rows of `tables` as one
    moment of the PostgreSQL database (one REPEATABLE READ transaction), copied as CSV (PostgreSQL's COPY)."""
    import duckdb

    from storage.migrations import apply_migrations

    con = duckdb.connect(":memory:")
    apply_migrations(con)
    con.execute("DELETE FROM model_versions")  # version 0 comes from the copy
    conn = connections.take()
    copied = False
    try:
        with tempfile.TemporaryDirectory(prefix="prefloop-pg-") as folder:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            for table in tables:
                types = {row[0]: row[1] for row in con.execute(f"DESCRIBE {table}").fetchall()}  # in column order
                path = Path(folder) / f"{table}.csv"
                if not _copy_out(conn, table, list(types), path):
                    continue  # no rows (DuckDB cannot read an empty CSV file)
                con.execute(
                    f"INSERT INTO {table} SELECT * FROM read_csv(?, header = false, columns = ?, delim = ',', "
                    "quote = '\"', escape = '\"', nullstr = '', allow_quoted_nulls = false, auto_detect = false, "
                    # told, not guessed from the first row (a \r in it made DuckDB expect \r\n and fail); a field
                    # may hold 1,000,000 characters of up to 4 bytes, twice in a prompts row
                    f"new_line = '\\n', max_line_size = {CSV_MAX_LINE})",
                    [str(path), types],
                )
            conn.execute("COMMIT")
        copied = True
    finally:
        connections.give(conn)
        if not copied:
            con.close()
    return con


def _copy_out(conn, table: str, columns: list[str], path: Path) -> int:
    """The table's rows as CSV in `path`; the bytes written."""
    names, size = ", ".join(columns), 0
    sql = f"COPY (SELECT {names} FROM {table}) TO STDOUT (FORMAT csv, FORCE_QUOTE *)"
    with path.open("wb") as out, conn.cursor().copy(sql) as copy:
        for chunk in copy:
            size += len(chunk)
            out.write(chunk)
    return size

"""Backups that survive losing the disk: append-only parquet shards of the store, restore, a scheduler.

(storage/backup_hub.py mirrors the folder with a Hugging Face dataset repo.)

A backup folder holds one subfolder per table and a manifest:

    manifest.json                               high-water marks and fingerprints (a cache, re-derived from shards)
    comparisons/000017-20250101T120000Z.parquet  rows added since the last flush (prompts, generations, comparisons)
    pairs/000017-20250101T120000Z.parquet        a full snapshot of a table that changes in place, when it changed

Row tables only grow, with increasing ids (every write commits under the store's one write lock, so ids commit in
order), so a flush writes the rows above the last high-water mark. The other tables (annotators, pairs,
training_runs, model_versions, app_settings, reward_scores, promotions) are updated in place or keyed without a
monotone id: a flush writes a full snapshot when their fingerprint changed, restore takes the newest, and only the
newest KEEP_SNAPSHOTS stay on disk. Every shard is written to a hidden temp name and renamed, so a crash never
leaves half a shard; each carries its own metadata, so the manifest can be rebuilt from the shards alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pyarrow.parquet as pq

log = logging.getLogger(__name__)

ROW_TABLES = {"prompts": "id", "generations": "id", "comparisons": "id"}
SNAPSHOT_TABLES = {
    "annotators": "name",
    "pairs": "id",
    "training_runs": "id",
    "model_versions": "id",
    "app_settings": "key",
    "reward_scores": "generation_id, reward_model_id",
    "promotions": "id",
}
TABLES = (*ROW_TABLES, *SNAPSHOT_TABLES)
# the tables with an id sequence
ID_TABLES = ("prompts", "generations", "pairs", "comparisons", "training_runs", "model_versions", "promotions")
NOT_BACKED_UP = ("migrations",)  # every new store applies its own migrations
MANIFEST = "manifest.json"
META_KEY = b"prefloop_backup"
KEEP_SNAPSHOTS = 2
KEEP_PRUNED = 200  # names of pruned snapshots remembered, so a Hub push can delete them there too
BATCH_ROWS = 50_000
EMPTY = "0:0:0"  # the fingerprint of an empty table
SHARD_NAME = re.compile(r"^(\d{6,})-\d{8}T\d{6}Z\.parquet$")

# Unique by the app's rules, without a UNIQUE constraint on DuckDB (migration m008 dropped them: their indexes cost
# each import's commit a second at 1M rows; writers look the keys up first): a restore must skip clashes on them too.
KEYS_WITHOUT_CONSTRAINT = {"prompts": [["hash"]], "comparisons": [["dedupe_key"]]}
MAX_BACKUP_EVERY_S = 7 * 86_400  # a week: a longer period (1e300 s) killed the backup thread with OverflowError


class BackupError(RuntimeError):
    """A backup that cannot be taken safely (e.g. the database is behind the backup folder)."""


# ---- shards and the manifest --------------------------------------------------------------------------------------
def list_shards(folder: str | Path, table: str) -> list[tuple[int, Path]]:
    """(flush number, path) of every complete shard of a table, oldest first."""
    paths = (Path(folder) / table).glob("*.parquet")
    return sorted((int(match.group(1)), path) for path in paths if (match := SHARD_NAME.match(path.name)))


def shard_meta(path: Path) -> dict:
    """What a shard says about itself: table, kind (rows | snapshot), flush, rows, and high_water with the
    created_at of that row (rows) or fingerprint (snapshot)."""
    return json.loads(pq.read_schema(path).metadata[META_KEY])


def load_state(folder: Path) -> dict:
    """The manifest, or an empty state when it is missing or unreadable, with any newer shards folded in."""
    state = {"flush": 0, "tables": {}, "pruned": []}
    try:
        state.update(json.loads((folder / MANIFEST).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass  # no manifest (new folder, fresh pull): everything comes from the shards
    newest = state["flush"]
    for table in TABLES:
        for number, path in list_shards(folder, table):
            if number > newest:  # written after the manifest (crash between shard and manifest, or pulled)
                _fold(state, shard_meta(path))
    return state


def _fold(state: dict, meta: dict) -> None:
    entry = state["tables"].setdefault(meta["table"], {})
    if meta["kind"] == "rows":
        if meta["high_water"] >= entry.get("high_water", 0):
            entry.update(high_water=meta["high_water"], created_at=meta["created_at"])
    elif meta["flush"] >= entry.get("flush", 0):
        entry.update(fingerprint=meta["fingerprint"], flush=meta["flush"])
    state["flush"] = max(state["flush"], meta["flush"])


def _write_parquet(path: Path, reader, meta: dict) -> None:
    """Stream a record batch reader into a parquet file carrying `meta`, and fsync it."""
    schema = reader.schema.with_metadata({META_KEY: json.dumps(meta).encode()})
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(temp) then rename over `path`: readers see the old file or the whole new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- flushing -----------------------------------------------------------------------------------------------------
class Backup:
    """Incremental parquet backups of one store into one folder (one Backup per folder at a time)."""

    def __init__(self, store, folder: str | Path):
        self.store, self.folder = store, Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in [p for d in (".", *TABLES) for p in self.folder.glob(f"{d}/.*.tmp")]:  # left by a crash
            stale.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self.state = load_state(self.folder)

    def flush(self) -> dict:
        """Write what changed since the last flush. Returns {"flush": number or None, "rows": {table: rows written},
        "seconds", "not_backed_up": [tables the backup does not know]}. Rows are read from one read-only snapshot
        of the database on a read cursor, never under the write lock."""
        with self._lock:
            started, number, written = time.monotonic(), self.state["flush"] + 1, {}
            try:
                with self.store.read() as cur:
                    cur.execute("BEGIN TRANSACTION")  # one consistent snapshot of every table
                    try:
                        unknown = self._unknown_tables(cur)
                        for table, plan in self._plan(cur):
                            self._write_shard(cur, table, plan, number)
                            written[table] = plan["rows"]
                    finally:
                        cur.execute("ROLLBACK")
            finally:
                if written:  # even when a later table failed: the shards written stay recorded
                    self.state["flush"] = number
                    self._prune()
                    manifest = json.dumps(self.state, indent=1)
                    _replace_atomically(
                        self.folder / MANIFEST, lambda temp: temp.write_text(manifest, encoding="utf-8")
                    )
            seconds = round(time.monotonic() - started, 3)
            return {
                "flush": number if written else None,
                "rows": written,
                "seconds": seconds,
                "not_backed_up": unknown,
            }

    def _plan(self, cur) -> list[tuple[str, dict]]:
        """(table, what to write) for every table with something new; BackupError when the database is behind."""
        plan = []
        for table, key in ROW_TABLES.items():
            done = self.state["tables"].get(table, {})
            if done and _created_at(cur, table, done["high_water"]) != done["created_at"]:
                raise BackupError(
                    f"the database does not hold the {table} row {done['high_water']} that the backup in "
                    f"{self.folder} ends with: restore the backup into this database first, or use another folder"
                )
            after = done.get("high_water", 0)
            top, new = _one(cur, f"SELECT coalesce(max({key}), 0), count(*) FILTER ({key} > ?) FROM {table}", [after])
            if new:
                plan.append(
                    (
                        table,
                        {
                            "kind": "rows",
                            "rows": new,
                            "after": after,
                            "high_water": top,
                            "created_at": _created_at(cur, table, top),
                        },
                    )
                )
        for table in SNAPSHOT_TABLES:
            rows, fingerprint = _fingerprint(cur, table)
            if fingerprint != self.state["tables"].get(table, {}).get("fingerprint", EMPTY):
                plan.append((table, {"kind": "snapshot", "rows": rows, "fingerprint": fingerprint}))
        return plan

    def _write_shard(self, cur, table: str, plan: dict, number: int) -> None:
        key = ROW_TABLES.get(table) or SNAPSHOT_TABLES[table]
        if plan["kind"] == "rows":
            sql = f"SELECT * FROM {table} WHERE {key} > $1 AND {key} <= $2 ORDER BY {key}"
            reader = cur.sql(sql, params=[plan["after"], plan["high_water"]]).to_arrow_reader(BATCH_ROWS)
        else:
            reader = cur.sql(f"SELECT * FROM {table} ORDER BY {key}").to_arrow_reader(BATCH_ROWS)
        meta = {"table": table, "flush": number, **{k: v for k, v in plan.items() if k != "after"}}
        name = f"{number:06d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.parquet"
        with reader:  # closed even when the write fails, so the cursor is free again
            _replace_atomically(self.folder / table / name, lambda temp: _write_parquet(temp, reader, meta))
        _fold(self.state, meta)

    def _prune(self) -> None:
        """Delete all but the newest KEEP_SNAPSHOTS snapshots of each table (restore reads only the newest)."""
        for table in SNAPSHOT_TABLES:
            for _, path in list_shards(self.folder, table)[:-KEEP_SNAPSHOTS]:
                path.unlink(missing_ok=True)
                self.state["pruned"] = [*self.state["pruned"], f"{table}/{path.name}"][-KEEP_PRUNED:]

    def _unknown_tables(self, cur) -> list[str]:
        names = {r[0] for r in cur.execute("SELECT table_name FROM duckdb_tables() WHERE NOT temporary").fetchall()}
        unknown = sorted(names - set(TABLES) - set(NOT_BACKED_UP))
        if unknown:
            log.warning("backup: tables %s are not backed up (storage/backup.py does not know them)", unknown)
        return unknown


def _created_at(cur, table: str, row_id: int) -> str | None:
    """When a row was made (µs): with its id, it tells this database's row from another one's with the same id."""
    found = cur.execute(f"SELECT created_at::VARCHAR FROM {table} WHERE id = ?", [row_id]).fetchall()
    return found[0][0] if found else None


def _fingerprint(cur, table: str) -> tuple[int, str]:
    """(rows, a fingerprint of the table's whole content): count, sum and xor of the row hashes."""
    rows, total, xor = _one(
        cur, f"SELECT count(*), coalesce(sum(hash(t)::HUGEINT), 0), coalesce(bit_xor(hash(t)), 0) FROM {table} t"
    )
    return int(rows), f"{rows}:{total}:{xor}"


# ---- restoring ----------------------------------------------------------------------------------------------------
def restore(store, folder: str | Path) -> dict[str, int]:
    """Load a backup folder into a store in one transaction; returns the rows added per table.

    Meant for a store just created on a new database file. Row tables get every shard, snapshot tables their newest
    snapshot; rows whose key already exists are skipped, so restoring twice adds nothing. On a fresh store (no
    prompts, generations, pairs, comparisons or runs, only model version 0) the snapshots replace the rows the
    migrations made (model version 0); on a store with data, existing rows always win. Finally every id sequence
    is moved past the largest restored id, so new rows never collide."""
    folder = Path(folder)
    with store.transaction() as cur:
        fresh = _is_fresh(cur)
        before = _counts(cur)
        for table in TABLES:
            shards = [path for _, path in list_shards(folder, table)][-1 if table in SNAPSHOT_TABLES else 0 :]
            if shards:
                _insert_shards(cur, table, shards, replace=fresh and table in SNAPSHOT_TABLES)
        _advance_sequences(cur)
        after = _counts(cur)
    return {table: after[table] - before[table] for table in TABLES}


def _is_fresh(cur) -> bool:
    rows = sum(_one(cur, f"SELECT count(*) FROM {t}")[0] for t in ID_TABLES if t != "model_versions")
    return rows == 0 and _one(cur, "SELECT count(*) FROM model_versions WHERE id <> 0")[0] == 0


def _counts(cur) -> dict[str, int]:
    return {table: int(_one(cur, f"SELECT count(*) FROM {table}")[0]) for table in TABLES}


def _one(cur, sql: str, params: list | None = None) -> tuple:
    """The one row of a query, read to the end (DuckDB refuses new work on a cursor with an unfinished result)."""
    return cur.execute(sql, params or []).fetchall()[0]


def _insert_shards(cur, table: str, paths: list[Path], replace: bool) -> None:
    """INSERT the shards' rows (columns both sides know) into the table, skipping rows whose key or any unique column
    is already there (an anti-join: DuckDB 2.0's ON CONFLICT DO NOTHING without a target wrongly drops rows with NULL
    in a unique column), or, with replace, replacing rows with the same key."""
    files = "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"
    source = f"read_parquet({files}, union_by_name = true)"
    have = {r[0] for r in cur.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    columns = ", ".join(r[0] for r in cur.execute(f"DESCRIBE {table}").fetchall() if r[0] in have)
    key = ROW_TABLES.get(table) or SNAPSHOT_TABLES[table]
    rows = f"SELECT DISTINCT ON ({key}) {columns} FROM {source}"  # a row in two shards (crash before manifest)
    if replace:
        cur.execute(f"INSERT OR REPLACE INTO {table} ({columns}) {rows}")
        return
    unique = [key.split(", "), *KEYS_WITHOUT_CONSTRAINT.get(table, [])] + [
        r[0]
        for r in cur.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() "
            "WHERE table_name = ? AND constraint_type = 'UNIQUE'",
            [table],
        ).fetchall()
    ]
    clashes = " OR ".join(
        "EXISTS (SELECT 1 FROM {} t WHERE {})".format(table, " AND ".join(f"t.{c} = s.{c}" for c in names))
        for names in unique
    )
    cur.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM ({rows}) s WHERE NOT ({clashes})")


def _advance_sequences(cur) -> None:
    """Move each <table>_id_seq past the table's largest id (DuckDB cannot ALTER a sequence: drop and recreate it;
    no column DEFAULT uses them, ids are given with nextval() in the INSERTs)."""
    following = dict(
        cur.execute(
            "SELECT sequence_name, coalesce(last_value + 1, start_value) FROM duckdb_sequences() "
            "WHERE schema_name = 'main'"
        ).fetchall()
    )
    for table in ID_TABLES:
        sequence = f"{table}_id_seq"
        start = int(_one(cur, f"SELECT coalesce(max(id), 0) + 1 FROM {table}")[0])
        if sequence in following and start > following[sequence]:
            cur.execute(f"DROP SEQUENCE {sequence}")
            cur.execute(f"CREATE SEQUENCE {sequence} START {start}")


# ---- the scheduler ------------------------------------------------------------------------------------------------
class BackupScheduler:
    """A daemon thread, started on construction, that flushes every `every_s` seconds and, given `hub` (a
    storage.backup_hub.HubSync), pushes after each flush that wrote something (and once after start).

    Call stop(flush=True) on the app's shutdown path (SIGTERM): it flushes and pushes
    once more. `extra()` gives {path in repo: local folder} uploaded with each push (e.g. training adapters)."""

    def __init__(
        self,
        store,
        folder: str | Path,
        every_s: float = 300,
        hub=None,
        extra: Callable[[], Mapping[str, str | Path]] | None = None,
    ):
        if not (0 < every_s <= MAX_BACKUP_EVERY_S):  # NaN passes no comparison: it would flush without pause
            raise ValueError(f"every_s must be in (0, {MAX_BACKUP_EVERY_S}] seconds, not {every_s}")
        self.backup, self.every_s, self.hub, self.extra = Backup(store, folder), every_s, hub, extra
        self.last_result, self.last_error = None, None  # the last flush's result; the last failure, until one works
        self._push_due = hub is not None  # push once after start, then after every flush that wrote something
        self._tick_lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="backup-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.run_now()

    def run_now(self) -> dict | None:
        """One flush (and push); its result, or None when it failed (the error is logged and kept in last_error)."""
        with self._tick_lock:
            try:
                result = self.backup.flush()
                self._push_due = self._push_due or (self.hub is not None and result["flush"] is not None)
                if self._push_due:
                    result["hub"] = self.hub.push(self.extra() if self.extra else None)
                    self._push_due = False
            except Exception as exc:  # noqa: BLE001 - a failed backup must not kill the thread; the next one retries
                log.exception("backup failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                return None
            self.last_result, self.last_error = result, None
            return result

    def stop(self, flush: bool = True, timeout: float | None = None) -> dict | None:
        """Stop the thread (waiting for a flush in progress) and, with flush=True, flush and push a last time."""
        self._stop.set()
        self._thread.join(timeout)
        return self.run_now() if flush else None

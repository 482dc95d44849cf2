"""PostgreSQL sessions that the server ends (a restart, an idle timeout, an admin): the pool and the runner lock must
notice, not find out by failing a vote or by two processes each believing they run the training queue."""

from __future__ import annotations

import contextlib

import psycopg
import pytest

import storage.postgres as pg
from storage.db import Store


@pytest.fixture
def url(pg_server) -> str:
    return pg_server.new_database()


def end_sessions(url: str, *, only_pid: int | None = None) -> None:
    """pg_terminate_backend: every session of the database (or one), as a server restart ends them."""
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
            "AND (%s::int IS NULL OR pid = %s::int)",
            [database, only_pid, only_pid],
        )


def test_a_lock_whose_session_the_server_ended_is_no_longer_held(url):
    first, second = Store(url), Store(url)
    try:
        assert first.hold_lock("runner") and not second.hold_lock("runner")
        holder = first._session_locks["runner"]._conn.info.backend_pid
        end_sessions(url, only_pid=holder)
        assert second.hold_lock("runner")  # the lock went with the session
        assert not first.hold_lock("runner")  # and the first process knows it no longer runs the queue
    finally:
        first.close()
        second.close()


def test_pooled_connections_the_server_ended_are_replaced_before_use(url, monkeypatch):
    monkeypatch.setattr(
        pg, "IDLE_CHECK_SECONDS", 0.0, raising=False
    )  # check every idle connection (else only after 5 s idle)
    store = Store(url)
    try:
        with contextlib.ExitStack() as held:  # eight connections at once: eight idle in the pool afterwards
            for _ in range(8):
                held.enter_context(store.read()).execute("SELECT 1").fetchall()
        end_sessions(url)
        for i in range(10):  # each used to fail on a dead pooled connection
            store.set_setting(f"after{i}", "1")
        assert store.get_setting("after9") == "1"
    finally:
        store.close()


def test_dates_come_in_iso_form_whatever_the_servers_datestyle(url):
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET datestyle = 'SQL, DMY'")
    store = Store(url)
    try:
        with store.read() as cur:
            assert cur.execute("SELECT current_date::VARCHAR").fetchone()[0][4] == "-"  # YYYY-MM-DD, not DD/MM/YYYY
    finally:
        store.close()


def test_two_processes_promoting_at_once_leave_exactly_one_version_serving(url):
    """Process one has marked version 1 serving and not yet committed when process two promotes version 2: two must
    wait for one's promotion and then retire version 1 (without the promotion lock, its UPDATE saw version 1 as a
    candidate and left both serving)."""
    import threading
    import time

    from storage.promotions import mark_serving, serve

    first, second = Store(url), Store(url)
    try:
        one, two = (first.add_version(base_model="m", adapter_path=f"/a{i}", parent_id=0) for i in (1, 2))
        with first.transaction(lock="promotion") as cur:
            mark_serving(cur, one)
            promoting = threading.Thread(target=serve, args=(second, two, one, "override", {}, "admin"))
            promoting.start()
            time.sleep(0.5)  # process two is now waiting
            assert promoting.is_alive()
        promoting.join(timeout=10)
        with second.read() as cur:
            serving = cur.execute("SELECT id FROM model_versions WHERE status = 'serving' ORDER BY id").fetchall()
        assert serving == [(two,)]
    finally:
        first.close()
        second.close()


def test_a_carriage_return_in_the_first_row_does_not_break_the_dpo_export(url, tmp_path):
    """The PostgreSQL tables reach DuckDB as CSV: DuckDB guessed the line ending from the first row, so a \\r there
    (CRLF text in a prompt) failed every dpo/reward export and reward scoring for good."""
    from storage.exporters import export
    from tests.datahelpers import seed_preferences

    store = Store(url)
    try:
        store.add_prompt("A prompt written on Windows:\r\nsecond line", "test")
        seed_preferences(store, 4)
        assert export(store, "dpo", tmp_path / "dpo.jsonl") == 4
    finally:
        store.close()


def test_a_lock_wait_that_fails_gives_its_connection_back(url):
    """A failed advisory-lock wait (lock_timeout, a cancel) left its pooled connection idle in an aborted
    transaction, outside the pool, until garbage collection."""
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE \"{database}\" SET lock_timeout = '200ms'")
        holder = psycopg.connect(url, autocommit=True)
        holder.execute("SELECT pg_advisory_lock(%s)", [pg.LOCKS["pairs"]])
        store = Store(url)
        try:
            kept = []  # the errors, kept as a watcher's last_error keeps one (with its traceback)
            for _ in range(3):
                with pytest.raises(psycopg.errors.LockNotAvailable) as failed:
                    with store.transaction(lock="pairs"):
                        pass
                kept.append(failed)
            aborted = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
                [database],
            ).fetchone()[0]
            assert aborted == 0
        finally:
            store.close()
            holder.close()

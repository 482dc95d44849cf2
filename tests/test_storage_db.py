"""The store itself: migrations, prompt dedupe, append-only corrections, concurrent writers, durability."""

from __future__ import annotations

import subprocess
import sys
import threading

import duckdb
import pytest

from storage.db import Store, canonical_messages
from storage.migrations import MIGRATIONS, apply_migrations


def test_migrations_apply_and_are_recorded(db_url):
    store = Store(db_url)
    with store.read() as cur:
        names = [r[0] for r in cur.execute("SELECT name FROM migrations ORDER BY id").fetchall()]
        tables = {r[0] for r in cur.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert names == [m.__name__ for m in MIGRATIONS]
    assert {
        "prompts",
        "generations",
        "pairs",
        "comparisons",
        "annotators",
        "model_versions",
        "training_runs",
    } <= tables
    assert store.get_version(0)["kind"] == "policy"
    store.close()


@pytest.mark.parametrize("already", range(1, len(MIGRATIONS)))
def test_a_file_made_by_an_older_migration_set_upgrades_without_loss(tmp_path, already):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    apply_migrations(con, MIGRATIONS[:already])
    con.execute(
        "INSERT INTO prompts (id, hash, messages, text, source) "
        "VALUES (nextval('prompts_id_seq'), 'h', '[]', 'hi', 't')"
    )
    con.close()
    store = Store(path)  # applies the rest
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)
        assert cur.execute("SELECT text FROM prompts").fetchall() == [("hi",)]
    store.set_setting("active_version", "3")
    assert store.get_setting("active_version") == "3"
    store.close()


@pytest.mark.parametrize("already", range(1, len(MIGRATIONS)))
def test_a_postgres_database_made_by_an_older_migration_set_upgrades_without_loss(pg_server, already):
    from storage.postgres import PgConnections

    url = pg_server.new_database()
    connections = PgConnections(url)
    apply_migrations(connections, MIGRATIONS[:already])
    with connections.cursor() as cur:
        cur.execute("INSERT INTO prompts (id, hash, messages, text, source) VALUES (nextval('prompts_id_seq'), 'h', "
                    "'[]', 'hi', 't')")  # fmt: skip
        if already >= 2:  # m002 made app_settings
            cur.execute("INSERT INTO app_settings VALUES ('active_version', '0', now())")
    connections.close()
    store = Store(url)  # applies the rest
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)
        assert cur.execute("SELECT text FROM prompts").fetchall() == [("hi",)]
    assert store.get_version(0)["status"] == "serving"
    store.close()


def test_migrations_are_known_by_name_not_by_position():
    """A list that gains an entry in the middle applies only that one; the others are not run again."""
    con = duckdb.connect(":memory:")
    calls = []

    def m_first(cur):
        calls.append("first")
        cur.execute("CREATE TABLE first_t (x INTEGER)")

    def m_last(cur):
        calls.append("last")
        cur.execute("CREATE TABLE last_t (x INTEGER)")

    def m_middle(cur):
        calls.append("middle")
        cur.execute("CREATE TABLE middle_t (x INTEGER)")

    assert apply_migrations(con, [m_first, m_last]) == ["m_first", "m_last"]
    assert apply_migrations(con, [m_first, m_middle, m_last]) == ["m_middle"]
    assert calls == ["first", "last", "middle"]
    names = [r[0] for r in con.execute("SELECT name FROM migrations ORDER BY id").fetchall()]
    assert names == ["m_first", "m_last", "m_middle"]
    with pytest.raises(ValueError, match="share a name"):
        apply_migrations(con, [m_first, m_first])


def test_prompts_are_stored_once_and_validated(db_url):
    store = Store(db_url)
    first = store.add_prompt("What is tea?", "test")
    assert store.add_prompt([{"role": "user", "content": "What is tea?"}], "other") == first
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is tea?"}]
    assert store.add_prompt(chat, "test") != first
    answered = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for bad, message in [("", "empty"), ([], "non-empty"), ([{"role": "bot", "content": "x"}], "role"),
                         (answered, "last message")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            canonical_messages(bad)
    assert store.stats()["prompts"] == 2
    store.close()


def test_an_answer_with_a_nul_character_is_stored(db_url):
    """A model can emit NUL (a tiny random one did, and PostgreSQL refused the pair: "text fields cannot contain NUL
    (0x00) bytes"). DuckDB keeps it; PostgreSQL stores U+FFFD in its place, in lists (arrays) as well."""
    store = Store(db_url)
    prompt = store.add_prompt("q\x00?", "test")
    generation = store.add_generation(prompt, "\x00 Clim Heightceeds", model_name="m\x00")
    stand_in = "\x00" if store.dialect == "duckdb" else "\ufffd"
    with store.read() as cur:
        assert cur.execute("SELECT text, model_name FROM generations WHERE id = ?", [generation]).fetchall() == [
            (f"{stand_in} Clim Heightceeds", f"m{stand_in}")
        ]
        found = cur.execute("SELECT count(*) FROM generations WHERE model_name = ANY(?)", [["m\x00"]]).fetchone()
        assert found == (1,)  # a lookup with the same text finds it
    assert store.add_prompt("q\x00?", "test") == prompt  # found again by its hash
    store.close()


def _pair(store):
    prompt = store.add_prompt("q", "test")
    return prompt, store.add_generation(prompt, "a", model_version_id=0), store.add_generation(prompt, "b")


def test_undo_is_a_superseding_row_and_bad_choices_are_refused(db_url):
    store = Store(db_url)
    prompt, a, b = _pair(store)
    first = store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="ann", choice="A")
    store.undo_comparison(first, "ann")
    with store.read() as cur:
        rows = cur.execute("SELECT choice, supersedes FROM comparisons ORDER BY id").fetchall()
        effective = cur.execute("SELECT count(*) FROM effective_comparisons").fetchone()[0]
    assert rows == [("A", None), ("undone", first)] and effective == 0
    with pytest.raises(ValueError, match="choice must be one of"):
        store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="ann", choice="C")
    with pytest.raises(ValueError, match="annotator"):
        store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator=" ", choice="A")
    with pytest.raises(ValueError, match="not an active judgement"):
        store.undo_comparison(first, "ann")
    store.close()


def test_sixteen_threads_write_3200_comparisons_all_present_none_twice(db_url):
    store = Store(db_url)
    prompt, a, b = _pair(store)
    ids: list[int] = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        mine = [
            store.add_comparison(
                prompt_id=prompt, generation_a=a, generation_b=b, annotator=f"w{k}", choice="B", rationale=f"{k}-{i}"
            )  # fmt: skip
            for i in range(200)
        ]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with store.read() as cur:
        rationales = [r[0] for r in cur.execute("SELECT rationale FROM comparisons").fetchall()]
    assert len(ids) == len(set(ids)) == 3200
    assert sorted(rationales) == sorted(f"{k}-{i}" for k in range(16) for i in range(200))
    store.close()


def test_a_committed_write_survives_a_hard_kill(db_url):
    path = db_url
    code = (
        f"import os; from storage.db import Store; s = Store({str(path)!r}); p = s.add_prompt('q', 't'); "
        "a = s.add_generation(p, 'a'); b = s.add_generation(p, 'b'); "
        "s.add_comparison(prompt_id=p, generation_a=a, generation_b=b, annotator='k', choice='A'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    store = Store(path)
    assert store.stats()["comparisons"] == 1
    store.close()


def test_an_unreachable_postgres_store_is_one_error_without_its_password():
    from storage.errors import StoreOpenError

    with pytest.raises(StoreOpenError) as caught:
        Store("postgresql://team:s3cret@127.0.0.1:1/prefloop")  # nothing listens on port 1
    message = str(caught.value)
    assert "s3cret" not in message and "postgresql://team:***@127.0.0.1:1/prefloop" in message
    assert "\n" not in message and "Connection refused" in message

"""Kept counts (storage/tallies.py) equal counting from scratch: after votes, undos, edits, restarts and restores."""

from __future__ import annotations

import random

from storage.db import Store
from storage.exporters import export_rows
from storage.ratings import MODEL_SQL
from storage.tallies import EVERYTHING, WHITESPACE, stats, tally, usable_pairs, vote_counts

EFFECTIVE = """SELECT c.* FROM comparisons c WHERE c.choice IN ('A', 'B', 'tie', 'both_bad')
    AND NOT EXISTS (SELECT 1 FROM comparisons later WHERE later.supersedes = c.id)"""  # the first definition


def counted_afresh(store) -> dict:
    """Store.stats() as it was computed before the kept counts: straight SQL over the whole table."""
    with store.read() as cur:
        grouped = lambda sql: {str(k): v for k, v in cur.execute(sql).fetchall()}  # noqa: E731
        return {
            "prompts": cur.execute("SELECT count(*) FROM prompts").fetchone()[0],
            "generations": cur.execute("SELECT count(*) FROM generations").fetchone()[0],
            "comparisons": cur.execute(f"SELECT count(*) FROM ({EFFECTIVE}) e").fetchone()[0],
            "pairs_ready": cur.execute("SELECT count(*) FROM pairs WHERE status = 'ready'").fetchone()[0],
            "per_choice": grouped(f"SELECT choice, count(*) FROM ({EFFECTIVE}) e GROUP BY 1 ORDER BY 1"),
            "per_annotator": grouped(f"SELECT annotator, count(*) FROM ({EFFECTIVE}) e GROUP BY 1 ORDER BY 1"),
            "per_source": grouped(f"SELECT source, count(*) FROM ({EFFECTIVE}) e GROUP BY 1 ORDER BY 1"),
            "per_model_version": grouped(
                f"SELECT coalesce({MODEL_SQL.format(g='g')}, '?'), count(*) "
                f"FROM ({EFFECTIVE}) c JOIN generations g ON g.id IN (c.generation_a, c.generation_b) "
                "GROUP BY 1 ORDER BY 1"
            ),
        }


def today_afresh(store, name: str) -> int:
    with store.read() as cur:
        sql = f"SELECT count(*) FROM ({EFFECTIVE}) e WHERE annotator = ? AND created_at >= current_date"
        return cur.execute(sql, [name]).fetchone()[0]


EDITS = [None, None, None, "", "  \n", "\u3000\u00a0", "Better answer.", "same", " padded edit "]


def add_judgements(store, rng: random.Random, count: int) -> None:
    """Comparisons of every kind: equal and different texts, versions and model names, edits (blank, equal to an
    original, real), skips, and undos of new and old judgements."""
    for _ in range(count):
        prompt = store.add_prompt(f"Question {rng.randrange(30)}?", "test")
        texts = ["same", "same"] if rng.random() < 0.2 else [f"answer {rng.random()}", rng.choice(["same", "x"])]
        gens = [
            store.add_generation(prompt, text, model_version_id=rng.choice([0, 1, None]),
                                 model_name=rng.choice([None, "gpt", "llama", "v1"]))
            for text in texts
        ]  # fmt: skip
        if rng.random() < 0.1:
            gens[1] = gens[0]  # an answer against itself
        store.add_comparison(
            prompt_id=prompt, generation_a=gens[0], generation_b=gens[1], annotator=rng.choice(["ann", "bob", "cy"]),
            choice=rng.choice(["A", "B", "tie", "both_bad", "skip"]), edited_answer=rng.choice(EDITS),
            source=rng.choice(["ui", "import:trl"]),
        )  # fmt: skip
        if rng.random() < 0.15:
            with store.read() as cur:
                ids = [r[0] for r in cur.execute("SELECT id, annotator FROM effective_comparisons").fetchall()]
                if ids:
                    target = rng.choice(ids)
                    who = cur.execute("SELECT annotator FROM comparisons WHERE id = ?", [target]).fetchone()[0]
            if ids:
                store.undo_comparison(target, who)


def check(store) -> None:
    assert stats(store) == counted_afresh(store)
    assert usable_pairs(store) == len(export_rows(store, "dpo"))
    for name in ("ann", "bob", "nobody"):
        assert vote_counts(store, name) == (counted_afresh(store)["comparisons"], today_afresh(store, name))


def test_kept_counts_equal_counting_afresh_as_judgements_arrive(db_url, monkeypatch):
    monkeypatch.setattr("storage.tallies.PG_FRESH_SECONDS", 0)  # PostgreSQL: counts afresh, here at every call
    rng = random.Random(7)
    store = Store(db_url)
    check(store)  # empty
    for _ in range(4):
        add_judgements(store, rng, 40)
        check(store)
    store.close()


def test_a_new_process_starts_from_the_snapshot_and_a_restore_below_the_watermark_recounts(tmp_path, monkeypatch):
    rng = random.Random(3)
    store = Store(tmp_path / "t.duckdb")
    add_judgements(store, rng, 60)
    check(store)
    store.close()
    store = Store(tmp_path / "t.duckdb")
    assert store.get_setting("tallies:stats") is not None
    seen = []
    real = tally(store, "stats")._measure
    monkeypatch.setattr(tally(store, "stats"), "_measure", lambda cur, low: seen.append(low) or real(cur, low))
    add_judgements(store, rng, 5)
    check(store)
    assert seen and seen[0] > 0  # counted from the saved watermark on, not from scratch
    with store.transaction() as cur:  # a row restored below the watermark (e.g. from a backup)
        cur.execute(
            "INSERT INTO comparisons (id, prompt_id, generation_a, generation_b, annotator, choice, source) "
            "SELECT -5, prompt_id, generation_a, generation_b, 'restored', 'A', 'ui' FROM comparisons LIMIT 1"
        )
    check(store)
    assert seen[-1] == EVERYTHING  # counted afresh
    store.close()


def test_recent_comparisons_are_the_newest_effective_ones(db_url):
    rng = random.Random(1)
    store = Store(db_url)
    add_judgements(store, rng, 80)
    with store.read() as cur:
        expected = [r[0] for r in cur.execute(f"SELECT id FROM ({EFFECTIVE}) e ORDER BY id DESC LIMIT 7").fetchall()]
    assert [row["id"] for row in store.recent_comparisons(7)] == expected
    assert len(store.recent_comparisons(1000)) == counted_afresh(store)["comparisons"]
    store.close()


def test_the_whitespace_set_is_what_str_strip_removes():
    assert WHITESPACE == "".join(ch for ch in map(chr, range(0x110000)) if ch.isspace())


def test_an_imported_model_named_like_a_version_is_counted_apart_from_it(db_url):
    """Per model version: answers of local version 1 and of an imported model called "v1" were one row "v1"."""
    store = Store(db_url)
    prompt = store.add_prompt("Which?", "test")
    local = store.add_generation(prompt, "local answer", model_version_id=1)
    imported = store.add_generation(prompt, "imported answer", model_name="v1")
    store.add_comparison(prompt_id=prompt, generation_a=local, generation_b=imported, annotator="ann", choice="A")
    assert stats(store)["per_model_version"] == {"v1": 1, "v1 (external)": 1}
    store.close()

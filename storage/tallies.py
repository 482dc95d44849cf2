"""Counts of the effective comparisons, kept up to date from the rows added since the last look.

Comparisons are append-only and every write commits under the store's one write lock, so ids grow in commit order:
the rows above the highest id counted so far (the watermark) are exactly what changed since. A refresh reads those
rows and the older rows they supersede, so it costs the same at a million judgements as at a hundred; a count over
the whole table happens once. Each tally keeps a snapshot in app_settings, so a new process (the app, `python -m
storage stats`) starts from it. Should rows ever appear at or below the watermark (a restore into a used store),
the number of rows up to it no longer matches and that tally is counted afresh.

Two tallies: "stats" (per choice, annotator, source, model version, and per annotator and day) and "usable" (the
rows a DPO export would hold: it compares answer texts, so it is kept apart and only the Train tab pays for it).
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import Counter

from storage.ratings import MODEL_SQL

EFFECTIVE_CHOICES = "('A', 'B', 'tie', 'both_bad')"
VERSION = 3  # of the snapshot format and of what is counted: a snapshot of another version is ignored
EVERYTHING = -(2**63)  # the watermark of a count from scratch (ids may be anything after a restore)
SAVE_EVERY = 10_000  # rows: the snapshot is saved again once the watermark moved this far (and after a full count)
WHITESPACE = (  # what str.strip() removes: every character whose isspace() is true (tests/test_tallies.py checks)
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
NOT_BLANK = "[^" + "".join(f"\\x{{{ord(ch):x}}}" for ch in WHITESPACE) + "]"  # RE2: a character strip() keeps


def stripped(text: str) -> str:
    """DuckDB SQL of `text` without the surrounding $ws characters (str.strip()). trim() only when an end is one of
    them: DuckDB's trim() reads the whole string (2M answers of 600 characters: 11.6 s; the test of the ends 0.2 s)."""
    return f"(CASE WHEN contains($ws, {text}[1]) OR contains($ws, {text}[-1]) THEN trim({text}, $ws) ELSE {text} END)"


# The signed rows that changed the effective set since watermark $low: +1 for each new effective row, -1 for each
# older effective row a new row supersedes (unless an older row already had). Parameters: $low.
CHANGED = f"""
fresh AS MATERIALIZED (
    SELECT id, prompt_id, choice, annotator, source, created_at, generation_a, generation_b, edited_answer, supersedes
    FROM comparisons WHERE id > $low),
gone AS MATERIALIZED (SELECT DISTINCT supersedes AS id FROM fresh WHERE supersedes IS NOT NULL),
changed AS MATERIALIZED (
    SELECT f.* EXCLUDE (supersedes), 1 AS sign FROM fresh f
    WHERE f.choice IN {EFFECTIVE_CHOICES} AND f.id NOT IN (SELECT id FROM gone)
    UNION ALL
    SELECT o.id, o.prompt_id, o.choice, o.annotator, o.source, o.created_at, o.generation_a, o.generation_b,
           o.edited_answer, -1 AS sign
    FROM gone g JOIN comparisons o ON o.id = g.id
    WHERE o.id <= $low AND o.choice IN {EFFECTIVE_CHOICES}
      AND o.id NOT IN (SELECT supersedes FROM comparisons WHERE id <= $low AND supersedes IS NOT NULL))"""

LABEL = f"coalesce({MODEL_SQL.format(g='g')}, '?')"  # an imported "v1" is "v1 (external)", not version 1
MEASURES = {  # rows (choice, annotator, source, day, model label, signed count), folded into dimensions by fold()
    "stats": f"""
        SELECT choice, annotator, source, created_at::DATE::VARCHAR, NULL, sum(sign) FROM changed GROUP BY ALL
        UNION ALL SELECT NULL, NULL, NULL, NULL, label, sum(sign) FROM (
            SELECT {LABEL} AS label, c.sign FROM changed c JOIN generations g ON g.id = c.generation_a
            UNION ALL
            SELECT {LABEL}, c.sign FROM changed c JOIN generations g ON g.id = c.generation_b
            WHERE c.generation_b <> c.generation_a) GROUP BY ALL""",
    # storage.exporters._pair_rows, counted: the clear winner over the loser when their texts differ, and an edited
    # answer (not blank, not equal to either original) over each distinct original; texts compared trimmed of $ws
    # (what str.strip() removes); only rows whose prompt and answers exist.
    "usable": f"""
        SELECT NULL, NULL, NULL, NULL, NULL, coalesce(sum(c.sign * (
            (c.choice IN ('A', 'B') AND {stripped("ga.text")} <> {stripped("gb.text")})::INTEGER
            + CASE WHEN regexp_matches(c.edited_answer, $not_blank)
                        AND {stripped("c.edited_answer")} NOT IN ({stripped("ga.text")}, {stripped("gb.text")})
                   THEN 1 + ({stripped("gb.text")} <> {stripped("ga.text")})::INTEGER
                   ELSE 0 END)), 0)
        FROM changed c JOIN prompts p ON p.id = c.prompt_id
        JOIN generations ga ON ga.id = c.generation_a JOIN generations gb ON gb.id = c.generation_b""",
}


# On PostgreSQL several app processes write at once, so ids do not commit in order and a watermark would miss rows:
# a tally there counts the effective comparisons afresh (indexed; a few hundred ms at a million), at most once per
# PG_FRESH_SECONDS per process — a vote receipt may lag that long.
PG_FRESH_SECONDS = 2.0
PG_MEASURES = {
    "stats": f"""
        SELECT choice, annotator, source, created_at::DATE::VARCHAR, NULL, count(*) FROM effective_comparisons
        GROUP BY 1, 2, 3, 4
        UNION ALL SELECT NULL, NULL, NULL, NULL, label, count(*) FROM (
            SELECT {LABEL} AS label FROM effective_comparisons c JOIN generations g ON g.id = c.generation_a
            UNION ALL
            SELECT {LABEL} FROM effective_comparisons c JOIN generations g ON g.id = c.generation_b
            WHERE c.generation_b <> c.generation_a) labels GROUP BY label""",
    "usable": """
        SELECT NULL, NULL, NULL, NULL, NULL, coalesce(sum(
            (c.choice IN ('A', 'B') AND btrim(ga.text, w.ws) <> btrim(gb.text, w.ws))::INTEGER
            + CASE WHEN btrim(c.edited_answer, w.ws) <> ''
                        AND btrim(c.edited_answer, w.ws) NOT IN (btrim(ga.text, w.ws), btrim(gb.text, w.ws))
                   THEN 1 + (btrim(gb.text, w.ws) <> btrim(ga.text, w.ws))::INTEGER
                   ELSE 0 END), 0)
        FROM effective_comparisons c CROSS JOIN (SELECT ?::VARCHAR AS ws) w JOIN prompts p ON p.id = c.prompt_id
        JOIN generations ga ON ga.id = c.generation_a JOIN generations gb ON gb.id = c.generation_b""",
}


def fold(rows: list[tuple]) -> list[tuple[str, str, int]]:
    """(dimension, key, signed count) of measured rows: per choice, annotator, source, 'day|annotator', model label;
    a row of only a count is the total ('usable' for that tally)."""
    folded = []
    for choice, annotator, source, day, label, n in rows:
        if label is not None:
            folded.append(("model", label, n))
        elif choice is None:
            folded.append(("usable", "", n))
        else:
            folded += [
                ("total", "", n),
                ("choice", choice, n),
                ("annotator", annotator, n),
                ("source", source, n),
                ("day", f"{day}|{annotator}", n),
            ]
    return folded


class Tally:
    """One set of counts ({dimension: {key: n}}) of the effective comparisons, refreshed from the watermark on."""

    def __init__(self, store, name: str):
        self.store, self.name, self.setting = store, name, f"tallies:{name}"
        self._lock = threading.Lock()
        self._state: dict | None = None  # {"version", "high", "rows", "today", "counts": {dim: {key: n}}}
        self._saved_high = EVERYTHING
        self._refreshed_at = -1.0  # monotonic time the last finished refresh began

    def counts(self) -> dict[str, dict[str | None, int]]:
        """The counts as of now: everything committed before this call is in them."""
        arrived = time.monotonic()
        with self._lock:
            if self._refreshed_at < arrived:  # else a refresh that began after we arrived has just run: use it
                began = time.monotonic()
                self._refresh()
                self._refreshed_at = began
            return {dim: dict(keys) for dim, keys in self._state["counts"].items()} | {"today": self._state["today"]}

    def _refresh(self) -> None:
        if self.store.dialect == "postgres":
            return self._count_afresh()
        if self._state is None:
            self._state = self._load()
        state = self._state
        with self.store.read() as cur:
            cur.execute("BEGIN TRANSACTION READ ONLY")  # one snapshot for the bounds and the rows counted
            try:
                high, rows, today = cur.execute(
                    "SELECT coalesce(max(id), 0), count(*), current_date::VARCHAR FROM comparisons"
                ).fetchall()[0]
                low = state["high"]
                if low is not None and (high, rows) == (low, state["rows"]):
                    state["today"] = today
                    return  # nothing was added
                above = None if low is None else cur.execute("SELECT count(*) FROM comparisons WHERE id > ?", [low])
                if (
                    above is None or rows - above.fetchall()[0][0] != state["rows"]
                ):  # first count, or rows appeared at or
                    state.update(high=None, rows=0, counts={})  # below the watermark (a restore): from scratch
                    low = EVERYTHING
                changes = self._measure(cur, low)
            finally:
                cur.execute("ROLLBACK")  # it wrote nothing
        counts = _added(state["counts"], changes)
        day = counts.get("day", Counter())
        counts["day"] = Counter({key: n for key, n in day.items() if key[:10] >= today})  # only today's are read
        counts = {dim: {key: n for key, n in keys.items() if n} for dim, keys in counts.items()}
        state.update(high=high, rows=rows, today=today, counts=counts)
        if low == EVERYTHING or high - self._saved_high >= SAVE_EVERY:
            self._save()

    def _count_afresh(self) -> None:
        if self._state is not None and time.monotonic() - self._state["at"] < PG_FRESH_SECONDS:
            return
        at = time.monotonic()
        with self.store.read() as cur:
            params = [WHITESPACE] if self.name == "usable" else None
            changes = fold(cur.execute(PG_MEASURES[self.name], params).fetchall())
            today = cur.execute("SELECT current_date::VARCHAR").fetchone()[0]
        counts = _added({}, changes)
        self._state = {"at": at, "today": today, "counts": {dim: dict(keys) for dim, keys in counts.items()}}

    def _measure(self, cur, low: int) -> list[tuple[str, str, int]]:
        """(dimension, key, signed count) of what changed since watermark `low`."""
        params = {"low": low} | ({"not_blank": NOT_BLANK, "ws": WHITESPACE} if self.name == "usable" else {})
        return fold(cur.execute(f"WITH {CHANGED} {MEASURES[self.name]}", params).fetchall())

    def _load(self) -> dict:
        fresh = {"version": VERSION, "high": None, "rows": 0, "today": "", "counts": {}}
        try:
            saved = json.loads(self.store.get_setting(self.setting) or "null")
        except (ValueError, TypeError):
            saved = None
        if not isinstance(saved, dict) or saved.get("version") != VERSION:
            return fresh
        self._saved_high = saved["high"] if isinstance(saved.get("high"), int) else EVERYTHING
        return saved

    def _save(self) -> None:
        self.store.set_setting(self.setting, json.dumps(self._state, ensure_ascii=False))
        self._saved_high = self._state["high"]


def _added(counts: dict, changes: list[tuple[str, str, int]]) -> dict[str, Counter]:
    """counts ({dimension: {key: n}}) plus the signed (dimension, key, n) changes."""
    total = {dim: Counter(keys) for dim, keys in counts.items()}
    for dim, key, n in changes:
        total.setdefault(dim, Counter())[key] += int(n or 0)
    return total


_TALLIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TALLIES_LOCK = threading.Lock()


def tally(store, name: str) -> Tally:
    """The store's tally `name` ("stats" or "usable"), one per store and process."""
    with _TALLIES_LOCK:
        found = _TALLIES.setdefault(store, {})
        if name not in found:
            found[name] = Tally(store, name)
        return found[name]


def sorted_counts(counts: dict) -> dict[str, int]:
    return {str(key): counts[key] for key in sorted(counts, key=str)}


def stats(store) -> dict:
    """Store.stats(): rows per table, and the effective comparisons per choice, annotator, source, model version."""
    counts = tally(store, "stats").counts()
    with store.read() as cur:
        sizes = cur.execute(
            "SELECT (SELECT count(*) FROM prompts), (SELECT count(*) FROM generations), "
            "(SELECT count(*) FROM pairs WHERE status = 'ready')"
        ).fetchall()[0]
    return {
        "prompts": sizes[0],
        "generations": sizes[1],
        "comparisons": counts.get("total", {}).get("", 0),
        "pairs_ready": sizes[2],
        "per_choice": sorted_counts(counts.get("choice", {})),
        "per_annotator": sorted_counts(counts.get("annotator", {})),
        "per_source": sorted_counts(counts.get("source", {})),
        "per_model_version": sorted_counts(counts.get("model", {})),
    }


def vote_counts(store, annotator: str | None) -> tuple[int, int]:
    """(effective judgements in all, this person's effective judgements dated today by the database's clock)."""
    counts = tally(store, "stats").counts()
    today, name = counts["today"], annotator or ""
    mine = sum(n for key, n in counts.get("day", {}).items() if key[:10] >= today and key[11:] == name)
    return counts.get("total", {}).get("", 0), mine


def usable_pairs(store) -> int:
    """How many rows a DPO export would hold now (storage.exporters, counted without building them)."""
    return tally(store, "usable").counts().get("usable", {}).get("", 0)


def warm(store) -> threading.Thread:
    """Bring both tallies up to date in the background (the first count of a big store takes a while); a failure
    (e.g. the store closed meanwhile) is left to the next caller, who counts on demand."""

    def count() -> None:
        try:
            stats(store)
            usable_pairs(store)
        except Exception:  # noqa: BLE001 - a warm-up only
            pass

    thread = threading.Thread(target=count, name="tallies-warm", daemon=True)
    thread.start()
    return thread

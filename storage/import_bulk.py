"""Bulk import of big preference files: read, checked, keyed and written by DuckDB, never one Python object per row.

import_file tries this first for .parquet and .jsonl files in the trl format (with a prompt column) and the arena
format. A file it cannot take whole (another shape, any row the row-by-row importer would refuse, anything unexpected)
gets None back, and the row-by-row importer (storage/importers.py) takes it, with its exact error messages. Both
store the same rows: the prompt hash and the dedupe key are sha256 of the same JSON text (the js() macro escapes a
string exactly as json.dumps(..., ensure_ascii=False) does), answers A then B, comparisons in file order. The checks
and the keys run on a read cursor; only the inserts hold the store's write lock.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from storage.db import MAX_FIELD_CHARS
from storage.errors import ImportFailed
from storage.import_formats import ARENA_CHOICES, detect_format
from storage.tallies import NOT_BLANK, WHITESPACE

BULK_FORMATS = ("trl", "arena")
SUFFIXES = (".parquet", ".jsonl")
ARENA_EXTRAS = ("question_id", "tstamp", "language")  # kept in each answer's params (import_formats.parse_arena)
PLAIN_TYPES = (
    "VARCHAR",
    "BIGINT",
    "INTEGER",
    "SMALLINT",
    "TINYINT",
    "UBIGINT",
    "UINTEGER",
    "USMALLINT",
    "UTINYINT",
    "DOUBLE",
    "BOOLEAN",
    '"NULL"',
)


def _escape_chain(value: str) -> str:
    """SQL of the JSON string body of `value`: backslash and quote escaped, then every control character."""
    sql = f"replace(replace({value}, '\\', '\\\\'), '\"', '\\\"')"
    for code in range(32):
        escape = {8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}.get(code, f"\\u{code:04x}")
        sql = f"replace({sql}, chr({code}), '{escape}')"
    return sql


MACROS = [
    # to_json() writes \u000B where json.dumps writes \u000b: a string whose JSON holds a \u00 takes the long way
    f"""CREATE OR REPLACE TEMP MACRO js(s) AS CASE WHEN contains(to_json(s)::VARCHAR, '\\u00')
        THEN '"' || {_escape_chain("s")} || '"' ELSE to_json(s)::VARCHAR END""",
    f"CREATE OR REPLACE TEMP MACRO not_blank(s) AS coalesce(regexp_matches(s, '{NOT_BLANK}'), false)",
    """CREATE OR REPLACE TEMP MACRO messages_ok(ms) AS coalesce(len(ms) > 0
        AND list_bool_and(list_transform(ms, lambda m: m.role IN ('system', 'user', 'assistant')
                                                       AND m.content IS NOT NULL)), false)""",
    """CREATE OR REPLACE TEMP MACRO prompt_ok(ms) AS coalesce(messages_ok(ms) AND ms[-1].role = 'user'
        AND not_blank(ms[-1].content), false)""",
]

# The common tail: from (n, prompt, text_a, text_b, model_a, model_b, choice, annotator, params_a, params_b, ok) to
# the stored forms and the JSON texts of the prompt hash and the dedupe key (sha256 follows, in _stage). Sorted keys
# (content, role) for those, as json.dumps(sort_keys=True) writes them.
KEYED = """
SELECT n, ok, '[' || sorted || ']' AS prompt_hash, stored AS messages, prompt[-1].content AS text,
       text_a, text_b, model_a, model_b, choice, annotator, params_a, params_b,
       ('["' || $fmt || '", [' || sorted || '], [[' || js(text_a) || ', ' || js(model_a) || '], ['
              || js(text_b) || ', ' || js(model_b) || ']], "' || choice || '", ' || js(annotator) || ']') AS key
FROM (SELECT *,
        array_to_string(list_transform(escaped, lambda m: '{"content": ' || m.content || ', "role": "' || m.role
                                                           || '"}'), ', ') AS sorted,
        '[' || array_to_string(list_transform(escaped, lambda m: '{"role": "' || m.role || '", "content": '
                                                                || m.content || '}'), ', ') || ']' AS stored
      FROM (SELECT *, list_transform(prompt, lambda m: {'role': m.role, 'content': js(m.content)}) AS escaped
            FROM ({rows})))"""


def bulk_import(store, path: Path, fmt: str, max_rows: int | None) -> dict | None:
    """Import the file in bulk, as import_file would; None when it must go row by row (nothing written then)."""
    if path.suffix.lower() not in SUFFIXES or fmt not in ("auto", *BULK_FORMATS) or store.dialect != "duckdb":
        return None  # PostgreSQL: the row-by-row importer, which writes a file in a few statements there too
    try:
        with store.read() as cur:
            if not _load(cur, path):
                return None
            count = cur.execute("SELECT count(*) FROM bulk_source").fetchall()[0][0]
            if count == 0 or (max_rows is not None and count > max_rows):
                return None
            if fmt == "auto":
                first = cur.sql("SELECT * EXCLUDE (__row) FROM bulk_source WHERE __row = 0").to_arrow_table()
                fmt = detect_format(path, ("row 1", first.to_pylist()[0]))
            staged = _stage(cur, fmt) if fmt in BULK_FORMATS else None
            cur.execute("DROP TABLE bulk_source")
    except (duckdb.Error, ValueError, TypeError):  # a shape the SQL did not foresee: the row-by-row importer decides
        return None
    if staged is None:
        return None
    try:
        return _write(store, staged, fmt)
    except Exception as exc:  # the transaction was rolled back: nothing of this file is stored
        raise ImportFailed(path, f"could not be stored ({exc})") from None


def _load(cur, path: Path) -> bool:
    """The file as temp table bulk_source, with its row number (from 0) in `__row`; False if it cannot be read so."""
    if path.suffix.lower() == ".parquet":
        source = f"read_parquet('{str(path).replace(chr(39), chr(39) * 2)}', file_row_number = true)"
        names = {row[0] for row in cur.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        if "__row" in names or "file_row_number" not in names:
            return False
        cur.execute(
            f"CREATE OR REPLACE TEMP TABLE bulk_source AS SELECT * EXCLUDE (file_row_number), "
            f"file_row_number AS __row FROM {source}"
        )
        return True
    import pyarrow as pa
    import pyarrow.json as pj

    try:
        table = pj.read_json(path)
    except (pa.ArrowException, OSError, ValueError):
        return False  # the row-by-row importer says what is wrong with it
    if "__row" in table.column_names:
        return False
    cur.register("bulk_file", table.append_column("__row", pa.array(range(table.num_rows), pa.int64())))
    cur.execute("CREATE OR REPLACE TEMP TABLE bulk_source AS SELECT * FROM bulk_file")
    cur.unregister("bulk_file")
    return True


def _stage(cur, fmt: str):
    """The file's rows keyed and in stored form (an Arrow table), or None when any row would be refused."""
    types = {name: str(kind) for name, kind, *_ in cur.execute("DESCRIBE bulk_source").fetchall()}
    rows = (_arena if fmt == "arena" else _trl)(types)
    if rows is None:
        return None
    for macro in MACROS:
        cur.execute(macro)
    longest = ", ".join(f"max({_longest(name, kind)})" for name, kind in types.items() if name != "__row")
    if any((n or 0) > MAX_FIELD_CHARS for n in cur.execute(f"SELECT {longest} FROM bulk_source").fetchall()[0]):
        return None  # a field over the limit: the row-by-row importer names it
    staged = cur.sql(KEYED.replace("{rows}", rows), params={"fmt": fmt}).to_arrow_table()
    if not all(staged.column("ok").to_pylist()):
        return None
    for name in ("prompt_hash", "key"):  # sha256 of the JSON texts: hashlib is several times faster than DuckDB's
        staged = staged.set_column(staged.column_names.index(name), name, _sha256(staged.column(name)))
    return staged.drop_columns(["ok"])


def _sha256(texts):
    """The hex sha256 of each UTF-8 string of an Arrow string column, hashed straight from its buffers."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    digests = []
    for chunk in texts.chunks:
        if len(chunk) == 0:
            continue
        width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1].tolist()
        data = memoryview(chunk.buffers()[2] or b"")
        digests += [hashlib.sha256(data[a:b]).hexdigest() for a, b in zip(offsets, offsets[1:], strict=False)]
    return pa.array(digests, pa.string())


def _longest(name: str, kind: str) -> str:
    """SQL of at least the length of the longest text in column `name` (its text form, or its messages' texts)."""
    plain = kind.replace('"', "")
    if _is_messages(kind) and plain.count("VARCHAR") == 2:  # only role and content are texts
        return f'list_max(list_transform("{name}", lambda m: greatest(length(m.role), length(m.content))))'
    return f'length("{name}"::VARCHAR)'


def _messages(column: str) -> str:
    return f"list_transform({column}, lambda m: {{'role': m.role, 'content': m.content}})"


def _is_messages(kind: str | None) -> bool:
    """A list of structs with (at least) a text role and a text content: chat messages."""
    plain = (kind or "").replace('"', "")
    return (
        plain.startswith("STRUCT(")
        and plain.endswith(")[]")
        and "role VARCHAR" in plain
        and "content VARCHAR" in plain
    )


def _arena(types: dict[str, str]) -> str | None:
    """SQL of arena rows as parse_arena makes them (the shared prefix of the two conversations is the prompt)."""
    need = ("model_a", "model_b", "winner", "conversation_a", "conversation_b")
    if any(types.get(name) != "VARCHAR" for name in need[:3]) or not all(_is_messages(types.get(n)) for n in need[3:]):
        return None
    extras = [name for name in ARENA_EXTRAS if name in types]
    if any(types[name] not in PLAIN_TYPES for name in extras):
        return None  # e.g. a timestamp: the row-by-row importer keeps str(value)
    judge = types.get("judge")
    if judge == "VARCHAR":
        annotator = f"CASE WHEN not_blank(judge) THEN trim(judge, '{WHITESPACE}') ELSE 'import:arena' END"
    else:
        annotator = "'import:arena'"
    finite = "".join(f' AND coalesce(isfinite("{n}"), true)' for n in extras if types[n] == "DOUBLE")
    plain = "".join(
        f""" || CASE WHEN "{n}" IS NULL THEN '' ELSE ', "{n}": ' || to_json("{n}")::VARCHAR END""" for n in extras
    )
    choices = " ".join(f"WHEN '{key}' THEN '{value}'" for key, value in ARENA_CHOICES.items())
    params = """'{"source": "import:arena"'""" + plain
    rest = """ || CASE WHEN len({0}) > 0 THEN ', "continuation": ' || to_json({0})::VARCHAR ELSE '' END || '}}'"""
    return f"""
        SELECT n, prompt, first_a.content AS text_a, first_b.content AS text_b, model_a, model_b,
               CASE winner {choices} END AS choice, annotator, {params}{rest.format("rest_a")} AS params_a,
               {params}{rest.format("rest_b")} AS params_b,
               coalesce(winner IN ({", ".join(f"'{k}'" for k in ARENA_CHOICES)}) AND not_blank(model_a)
                        AND not_blank(model_b) AND messages_ok(a) AND messages_ok(b) AND size > 0
                        AND NOT (size = len(a) AND size = len(b)) AND prompt_ok(prompt)
                        AND first_a.role = 'assistant' AND first_b.role = 'assistant' {finite}, false) AS ok
        FROM (SELECT *, a[1:size] AS prompt, a[size + 1] AS first_a, b[size + 1] AS first_b, a[size + 2:] AS rest_a,
                     b[size + 2:] AS rest_b
              FROM (SELECT *, coalesce(list_position(list_transform(range(1, least(len(a), len(b)) + 1),
                                                                    lambda i: a[i] = b[i]), false) - 1,
                                       least(len(a), len(b))) AS size
                    FROM (SELECT __row AS n, model_a, model_b, winner, {annotator} AS annotator,
                                 {_messages("conversation_a")} AS a, {_messages("conversation_b")} AS b
                                 {"".join(f', "{name}"' for name in extras)}
                          FROM bulk_source)))"""


def _trl(types: dict[str, str]) -> str | None:
    """SQL of trl rows with an explicit prompt, as parse_trl makes them (chosen on side A, choice A)."""
    prompt, chosen, rejected = types.get("prompt"), types.get("chosen"), types.get("rejected")
    kinds = {"VARCHAR": "text", **{kind: "chat" for kind in (prompt, chosen, rejected) if _is_messages(kind)}}
    if prompt not in kinds or chosen not in kinds or rejected not in kinds or kinds[prompt] != kinds[chosen]:
        return None  # an implicit prompt, or a type the row-by-row importer decides on
    if kinds[prompt] == "text":
        messages, prompt_ok = "[{'role': 'user', 'content': prompt}]", "not_blank(prompt)"
    else:
        messages, prompt_ok = _messages("prompt"), f"prompt_ok({_messages('prompt')})"

    def answer(name: str, kind: str) -> tuple[str, str]:
        if kinds[kind] == "text":
            return name, f"{name} IS NOT NULL"
        return (
            f"{name}[1].content",
            f"len({name}) = 1 AND {name}[1].role = 'assistant' AND {name}[1].content IS NOT NULL",
        )

    (text_a, ok_a), (text_b, ok_b) = answer("chosen", chosen), answer("rejected", rejected)
    return f"""
        SELECT __row AS n, {messages} AS prompt, {text_a} AS text_a, {text_b} AS text_b, 'import:chosen' AS model_a,
               'import:rejected' AS model_b, 'A' AS choice, 'import:trl' AS annotator,
               '{{"source": "import:trl"}}' AS params_a, '{{"source": "import:trl"}}' AS params_b,
               coalesce(prompt IS NOT NULL AND {prompt_ok} AND {ok_a} AND {ok_b}, false) AS ok
        FROM bulk_source"""


def _write(store, staged, fmt: str) -> dict:
    """The staged rows into prompts, annotators, generations and comparisons: one transaction, a few statements."""
    source = f"import:{fmt}"
    with store.transaction() as cur:
        cur.register("bulk_rows", staged)
        cur.execute(
            "CREATE OR REPLACE TEMP TABLE bulk_prompts AS SELECT *, row_number() OVER (ORDER BY first) AS pos FROM ("
            "SELECT prompt_hash, arg_min(messages, n) AS messages, arg_min(text, n) AS text, min(n) AS first "
            "FROM bulk_rows WHERE prompt_hash NOT IN (SELECT p.hash FROM prompts p JOIN bulk_rows b "
            "ON b.prompt_hash = p.hash) GROUP BY prompt_hash)"
        )
        first = _ids(cur, "bulk_prompts", "prompts_id_seq", 1)
        cur.execute(
            "INSERT INTO prompts (id, hash, messages, text, source) "
            "SELECT ? + pos - 1, prompt_hash, messages, text, ? FROM bulk_prompts ORDER BY pos",
            [first, source],
        )
        cur.execute(
            "CREATE OR REPLACE TEMP TABLE bulk_new AS SELECT *, row_number() OVER (ORDER BY n) AS pos FROM ("
            "SELECT b.n, p.id AS prompt_id FROM bulk_rows b JOIN prompts p ON p.hash = b.prompt_hash "
            "WHERE b.key NOT IN (SELECT c.dedupe_key FROM comparisons c JOIN bulk_rows k ON k.key = c.dedupe_key) "
            "QUALIFY row_number() OVER (PARTITION BY b.key ORDER BY b.n) = 1)"
        )  # a key stored before, or seen earlier in this file, is a comparison already there
        generation = _ids(cur, "bulk_new", "generations_id_seq", 2)
        comparison = _ids(cur, "bulk_new", "comparisons_id_seq", 1)
        new_rows = "bulk_new JOIN bulk_rows USING (n)"
        cur.execute(
            f"INSERT INTO annotators (name) SELECT DISTINCT annotator FROM {new_rows} ORDER BY 1 "
            "ON CONFLICT DO NOTHING"
        )
        cur.execute(
            "INSERT INTO generations (id, prompt_id, model_name, text, params) SELECT * FROM ("
            f"SELECT $g + 2 * (pos - 1), prompt_id, model_a, text_a, params_a FROM {new_rows} UNION ALL "
            f"SELECT $g + 2 * (pos - 1) + 1, prompt_id, model_b, text_b, params_b FROM {new_rows}) ORDER BY 1",
            {"g": generation},
        )
        cur.execute(
            "INSERT INTO comparisons (id, prompt_id, generation_a, generation_b, annotator, choice, source, "
            "dedupe_key) SELECT $c + pos - 1, prompt_id, $g + 2 * (pos - 1), $g + 2 * (pos - 1) + 1, annotator, "
            f"choice, $source, key FROM {new_rows} ORDER BY pos",
            {"c": comparison, "g": generation, "source": source},
        )
        counts = cur.execute("SELECT count(DISTINCT prompt_hash), count(DISTINCT key) FROM bulk_rows").fetchall()[0]
        cur.execute("DROP TABLE bulk_prompts")
        cur.execute("DROP TABLE bulk_new")
        cur.unregister("bulk_rows")
    return {"format": fmt, "prompts": int(counts[0]), "comparisons": int(counts[1])}


def _ids(cur, table: str, sequence: str, per_row: int) -> int:
    """Take `per_row` ids of `sequence` for each row of `table`; the first of them (they are consecutive: every
    insert runs under the store's write lock, which this transaction holds)."""
    count = cur.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0] * per_row
    if count == 0:
        return 0
    first, last = cur.execute(
        f"SELECT min(v), max(v) FROM (SELECT nextval('{sequence}') AS v FROM range(?))", [count]
    ).fetchall()[0]
    if last - first != count - 1:
        raise RuntimeError(f"{sequence} handed out ids that are not consecutive")
    return int(first)

"""Bulk import of big preference files: read, checked, keyed and written by DuckDB, never one Python object per row.

import_file tries this first for .parquet and .jsonl files in the trl format (with a prompt column) and the arena
format. A file it cannot take whole (another shape, any row the row-by-row importer would refuse, anything unexpected)
gets None back, and the row-by-row importer (storage/importers.py) takes it, with its exact error messages. Both
store the same rows: the prompt hash and the dedupe key are sha256 of the same JSON text (the js() macro escapes a
string exactly as json.dumps(..., ensure_ascii=False) does), answers A then B, comparisons in file order. The checks
and the keys run on a read cursor; the lookups of stored keys and the inserts hold the store's write lock.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import duckdb

from storage.db import MAX_FIELD_CHARS
from storage.errors import ImportFailed
from storage.import_checks import MACROS, jsonl_layout_ok, sha256_texts
from storage.import_formats import ARENA_CHOICES, row_format
from storage.tallies import WHITESPACE

BULK_FORMATS = ("trl", "arena")
RANGE_ROWS = 20_000  # fewer rows than this per range: the threads cost more than they save
SUFFIXES = (".parquet", ".jsonl")
ARENA_EXTRAS = ("question_id", "tstamp", "language")  # kept in each answer's params (import_formats.parse_arena)
PLAIN_TYPES = ("VARCHAR", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "UBIGINT", "UINTEGER", "USMALLINT", "UTINYINT",
               "DOUBLE", "BOOLEAN", '"NULL"')  # fmt: skip


# The common tail: from (n, prompt, text_a, text_b, model_a, model_b, choice, annotator, params_a, params_b, ok)
# to the stored forms and the hashes of the JSON texts of the prompt and of the dedupe key ({sha}: sha256_texts).
# Sorted keys (content, role) for those, as json.dumps(sort_keys=True) writes them. concat(), not ||: a chain of ||
# copies the growing string at each step (ten times slower on these 1.5 KB keys); the two differ only on NULLs, which
# no row that passes the checks (ok) has.
KEYED = """
SELECT n, ok, __longest AS longest, {sha}(concat('[', sorted, ']')) AS prompt_hash, stored AS messages,
       prompt[-1].content AS text, text_a, text_b, model_a, model_b, choice, annotator, params_a, params_b,
       {sha}(concat('["', $fmt, '", [', sorted, '], [[', js(text_a), ', ', js(model_a), '], [', js(text_b), ', ',
                    js(model_b), ']], "', choice, '", ', js(annotator), ']')) AS key
FROM (SELECT *,
        array_to_string(list_transform(escaped, lambda m: concat('{"content": ', m.content, ', "role": "', m.role,
                                                                 '"}')), ', ') AS sorted,
        concat('[', array_to_string(list_transform(escaped, lambda m: concat('{"role": "', m.role, '", "content": ',
                                                                             m.content, '}')), ', '), ']') AS stored
      FROM (SELECT *, list_transform(prompt, lambda m: {'role': m.role, 'content': js(m.content)}) AS escaped
            FROM ({rows})))"""


def bulk_import(store, path: Path, fmt: str, max_rows: int | None) -> dict | None:
    """Import the file in bulk, as import_file would; None when it must go row by row (nothing written then)."""
    if path.suffix.lower() not in SUFFIXES or fmt not in ("auto", *BULK_FORMATS) or store.dialect != "duckdb":
        return None  # PostgreSQL: the row-by-row importer, which writes a file in a few statements there too
    try:
        with store.read() as cur, _source(cur, path) as (source, count):
            if not count or (max_rows is not None and count > max_rows):
                return None
            auto = fmt == "auto"  # then every row must be of the first one's format (import_formats.detect_format)
            if auto:
                first = cur.sql(f"SELECT * EXCLUDE (__row) FROM {source} LIMIT 1").to_arrow_table()
                fmt = row_format(path, "row 1", first.to_pylist()[0])
            parquet = path.suffix.lower() == ".parquet"
            ranges = _ranges(cur, count) if parquet else [(0, count)]
            staged = _stage(cur, source, fmt, ranges, auto, parquet) if fmt in BULK_FORMATS else None
    except (duckdb.Error, ValueError, TypeError):  # a shape the SQL did not foresee: the row-by-row importer decides
        return None
    if staged is None:
        return None
    try:
        return _write(store, staged, fmt)
    except Exception as exc:  # the transaction was rolled back: nothing of this file is stored
        raise ImportFailed(path, f"could not be stored ({exc})") from None


@contextlib.contextmanager
def _source(cur, path: Path):
    """(SQL of the file's rows with their row number from 0 in `__row`, the row count); (None, 0) if the file cannot
    be read so. Parquet is scanned where it lies (each query streams it; nothing is copied first)."""
    if path.suffix.lower() == ".parquet":
        quoted = "'" + str(path).replace("'", "''") + "'"
        source = f"read_parquet({quoted}, file_row_number = true)"
        names = {row[0] for row in cur.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        if "__row" in names or "file_row_number" not in names:
            yield None, 0
            return
        count = cur.execute(f"SELECT count(*) FROM read_parquet({quoted})").fetchall()[0][0]  # from the metadata
        yield f"(SELECT * EXCLUDE (file_row_number), file_row_number AS __row FROM {source})", count
        return
    import pyarrow as pa

    try:  # only a file nested at most MAX_DEPTH deep (pyarrow crashes on a deeper one) and with one object per line
        # (pyarrow also reads two on a line, or one over several lines) goes to pyarrow: import_checks.jsonl_layout_ok
        table = _read_jsonl(path.read_bytes())
    except (pa.ArrowException, OSError, ValueError):
        table = None  # the row-by-row importer says what is wrong with it
    if table is None or "__row" in table.column_names:
        yield None, 0
        return
    name = f"bulk_file_{uuid.uuid4().hex}"
    cur.register(name, table.append_column("__row", pa.array(range(table.num_rows), pa.int64())))
    try:
        yield name, table.num_rows
    finally:
        cur.unregister(name)


def _read_jsonl(data: bytes):
    import pyarrow as pa
    import pyarrow.json as pj

    return pj.read_json(pa.BufferReader(data)) if jsonl_layout_ok(data) else None


def _stage(cur, source: str, fmt: str, ranges: list[tuple[int, int]], auto: bool, parquet: bool):
    """The file's rows keyed and in stored form (an Arrow table), or None when any row would be refused.

    One pass over the file: the SQL builds each row's stored forms and the JSON texts of its keys, and a Python
    function hashes those texts batch by batch as DuckDB hands them over (hashlib's sha256 uses the CPU's SHA
    instructions; DuckDB's sha256() is about four times slower here), so the texts are never stored whole. The rows
    of a parquet file are staged in row ranges on parallel cursors (_ranges): DuckDB runs one row group on one thread,
    and a file written in one row group (pyarrow's default up to 1M rows) would leave the other cores idle."""
    types = {name: str(kind) for name, kind, *_ in cur.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    rows = _arena(types, parquet) if fmt == "arena" else _trl(types, auto)
    if rows is None:
        return None

    def longest(length: str) -> str:  # the longest field of each row, as the row-by-row importer measures it
        return ", ".join(f"{_longest(name, kind, length)}" for name, kind in types.items() if name != "__row")

    def stage(part: tuple[int, int]):
        whole = len(ranges) == 1  # else a cursor per thread (a JSONL table, always whole, is registered on cur)
        with contextlib.nullcontext(cur) if whole else contextlib.closing(cur.cursor()) as own:
            for macro in MACROS:
                own.execute(macro)
            sha = f"bulk_sha256_{uuid.uuid4().hex}"
            own.create_function(
                sha, sha256_texts, [duckdb.sqltype("VARCHAR")], duckdb.sqltype("VARCHAR"), type="arrow"
            )
            ranged = source if whole else f"(SELECT * FROM {source} WHERE __row BETWEEN {part[0]} AND {part[1] - 1})"
            measured = f"(SELECT *, greatest({longest('strlen')}) AS __longest FROM {ranged})"
            sql = KEYED.replace("{rows}", rows.replace("{source}", measured)).replace("{sha}", sha)
            try:
                return own.sql(sql, params={"fmt": fmt}).to_arrow_table()
            finally:
                own.remove_function(sha)

    import pyarrow as pa
    import pyarrow.compute as pc

    if len(ranges) == 1:
        staged = stage(ranges[0])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(ranges)) as pool:
            staged = pa.concat_tables(list(pool.map(stage, ranges)))
    if not pc.all(staged.column("ok")).as_py():
        return None
    if (pc.max(staged.column("longest")).as_py() or 0) > MAX_FIELD_CHARS:  # bytes: an upper bound; now characters
        if (cur.execute(f"SELECT max(greatest({longest('length')})) FROM {source}").fetchall()[0][0] or 0) > (
            MAX_FIELD_CHARS
        ):
            return None  # a field over the limit: the row-by-row importer names it
    if not pc.all(pc.equal(staged.column("n"), pa.array(range(len(staged)), pa.int64()))).as_py():
        staged = staged.sort_by("n")  # _take finds row n at place n (the scan keeps the file's order: never so far)
    return staged.drop_columns(["ok", "longest"])


def _ranges(cur, count: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) to stage side by side: one per DuckDB thread (at most 4), none under RANGE_ROWS."""
    threads = int(cur.execute("SELECT current_setting('threads')").fetchall()[0][0])
    parts = max(1, min(threads, 4, count // RANGE_ROWS))
    bounds = [count * i // parts for i in range(parts + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def _longest(name: str, kind: str, length: str) -> str:
    """SQL of at least the length of the longest text in column `name` (its text form, or its messages' texts), in
    bytes (`length` strlen: an upper bound on the characters, stored with each string) or in characters."""
    plain = kind.replace('"', "")
    if _is_messages(kind) and plain.count("VARCHAR") == 2:  # only role and content are texts
        longest = f"greatest({length}(m.role), {length}(m.content))"
        return f'coalesce(list_max(list_transform("{name}", lambda m: {longest})), 0)'
    return f'coalesce({length}("{name}"::VARCHAR), 0)'


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


def _arena(types: dict[str, str], parquet: bool) -> str | None:
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
    # Each extra as json.dumps writes it in the row importer's params: a text through js(); DuckDB writes a double as
    # Python does only for 0 and 1e-4 <= |x| < 1e16, and a double read from JSON Lines may have been an integer there
    # (5, not 5.0): any other double goes row by row.
    exact = "".join(f' AND coalesce(plain_double("{n}"), true)' for n in extras if types[n] == "DOUBLE")
    exact += "".join(
        f' AND coalesce("{n}" <> trunc("{n}"), true)' for n in extras if types[n] == "DOUBLE" and not parquet
    )
    value = {n: f'js("{n}")' if types[n] == "VARCHAR" else f'to_json("{n}")::VARCHAR' for n in extras}
    plain = "".join(f""", CASE WHEN "{n}" IS NULL THEN '' ELSE concat(', "{n}": ', {value[n]}) END""" for n in extras)
    choices = " ".join(f"WHEN '{key}' THEN '{value}'" for key, value in ARENA_CHOICES.items())

    def params(rest: str) -> str:
        chat = f"""CASE WHEN len({rest}) > 0 THEN concat(', "continuation": ', {_chat_json(rest)}) ELSE '' END"""
        return f"""concat('{{"source": "import:arena"'{plain}, {chat}, '}}')"""

    return f"""
        SELECT n, __longest, prompt, first_a.content AS text_a, first_b.content AS text_b, model_a, model_b,
               CASE winner {choices} END AS choice, annotator, {params("rest_a")} AS params_a,
               {params("rest_b")} AS params_b,
               coalesce(winner IN ({", ".join(f"'{k}'" for k in ARENA_CHOICES)}) AND not_blank(model_a)
                        AND not_blank(model_b) AND messages_ok(a) AND messages_ok(b) AND size > 0
                        AND NOT (size = len(a) AND size = len(b)) AND prompt_ok(prompt)
                        AND first_a.role = 'assistant' AND first_b.role = 'assistant' {exact}, false) AS ok
        FROM (SELECT *, a[1:size] AS prompt, a[size + 1] AS first_a, b[size + 1] AS first_b, a[size + 2:] AS rest_a,
                     b[size + 2:] AS rest_b
              FROM (SELECT *, coalesce(list_position(list_transform(range(1, least(len(a), len(b)) + 1),
                                                                    lambda i: a[i] = b[i]), false) - 1,
                                       least(len(a), len(b))) AS size
                    FROM (SELECT __row AS n, __longest, model_a, model_b, winner, {annotator} AS annotator,
                                 {_messages("conversation_a")} AS a, {_messages("conversation_b")} AS b
                                 {"".join(f', "{name}"' for name in extras)}
                          FROM {{source}})))"""


def _chat_json(column: str) -> str:
    """SQL of json.dumps of a message list (role and content only), as stored."""
    pair = "'\"role\": ', js(m.role), ', ', '\"content\": ', js(m.content)"
    return f"concat('[', array_to_string(list_transform({column}, lambda m: concat('{{', {pair}, '}}')), ', '), ']')"


def _trl(types: dict[str, str], auto: bool) -> str | None:
    """SQL of trl rows with an explicit prompt, as parse_trl makes them (chosen on side A, choice A). Detected (auto),
    no row may look like hh (a 'Human:' transcript): the row-by-row importer refuses a file that mixes formats."""
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
    if auto and kinds[chosen] == "text":  # as import_formats.row_format tells hh from trl
        ok_a += " AND NOT (contains(chosen, chr(10) || chr(10) || 'Human:') OR starts_with(chosen, 'Human:'))"
    return f"""
        SELECT __row AS n, __longest, {messages} AS prompt, {text_a} AS text_a, {text_b} AS text_b,
               'import:chosen' AS model_a, 'import:rejected' AS model_b, 'A' AS choice, 'import:trl' AS annotator,
               '{{"source": "import:trl"}}' AS params_a, '{{"source": "import:trl"}}' AS params_b,
               coalesce(prompt IS NOT NULL AND {prompt_ok} AND {ok_a} AND {ok_b} AND {text_a} <> {text_b}, false) AS ok
        FROM {{source}}"""


def _write(store, staged, fmt: str) -> dict:
    """The staged rows into prompts, annotators, generations and comparisons: one transaction, a few statements.

    Prompts and comparisons already stored are found by hash join on their keys (prompts.hash, dedupe_key), so are
    repeats within the file (the first row of each key counts). Those joins and sorts see only the keys and row
    numbers; the rows to store are then taken from the staged Arrow table by row number and inserted as they stand
    (joining the wide staged rows in SQL made DuckDB hash every text: 10 times slower). Ids are the row importer's
    (answers A then B of each comparison, in file order); the generations are written as all the A answers, then
    all the B ones, so their rows lie in that order, not by id (every reader orders or looks them up by id)."""
    import pyarrow as pa

    source = f"import:{fmt}"
    keys, rows = f"bulk_keys_{uuid.uuid4().hex}", f"bulk_new_{uuid.uuid4().hex}"
    with store.transaction() as cur:
        cur.register(keys, staged.select(["n", "prompt_hash", "key"]))
        cur.execute(
            "CREATE OR REPLACE TEMP TABLE bulk_prompts AS SELECT s.prompt_hash, s.first, p.id AS stored, "
            "CASE WHEN p.id IS NULL THEN row_number() OVER (PARTITION BY p.id IS NULL ORDER BY s.first) END AS pos "
            f"FROM (SELECT prompt_hash, min(n) AS first FROM {keys} GROUP BY prompt_hash) s LEFT JOIN "
            f"(SELECT hash, min(id) AS id FROM prompts SEMI JOIN {keys} b ON b.prompt_hash = prompts.hash "
            "GROUP BY hash) p ON p.hash = s.prompt_hash"
        )
        first = _ids(cur, "bulk_prompts WHERE pos IS NOT NULL", "prompts_id_seq", 1)
        new = cur.sql("SELECT first FROM bulk_prompts WHERE pos IS NOT NULL ORDER BY pos").to_arrow_table()
        prompts = _take(staged, new.column(0), ["prompt_hash", "messages", "text"])
        cur.register(rows, prompts.append_column("id", pa.array(range(first, first + len(prompts)), pa.int64())))
        cur.execute(
            f"INSERT INTO prompts (id, hash, messages, text, source) SELECT id, prompt_hash, messages, text, $source "
            f"FROM {rows}",
            {"source": source},
        )
        cur.unregister(rows)
        new = cur.sql(
            "SELECT s.n, coalesce(k.stored, $p + k.pos - 1) AS prompt_id "
            f"FROM (SELECT key, min(n) AS n, any_value(prompt_hash) AS prompt_hash FROM {keys} GROUP BY key) s "
            "ANTI JOIN (SELECT dedupe_key FROM comparisons WHERE dedupe_key IS NOT NULL) c ON c.dedupe_key = s.key "
            "JOIN bulk_prompts k ON k.prompt_hash = s.prompt_hash ORDER BY s.n",
            params={"p": first},
        ).to_arrow_table()  # a key stored before, or seen earlier in this file, is a comparison already there
        generation = _ids(cur, len(new), "generations_id_seq", 2)
        comparison = _ids(cur, len(new), "comparisons_id_seq", 1)
        fields = ["model_a", "model_b", "text_a", "text_b", "params_a", "params_b", "annotator", "choice", "key"]
        table = _take(staged, new.column("n"), fields)
        table = table.append_column("prompt_id", new.column("prompt_id"))
        cur.register(rows, table.append_column("pos", pa.array(range(len(table)), pa.int64())))
        cur.execute(
            f"INSERT INTO annotators (name) SELECT DISTINCT annotator FROM {rows} ORDER BY 1 ON CONFLICT DO NOTHING"
        )
        for side, offset in (("a", 0), ("b", 1)):  # all the A answers, then all the B ones: each a plain scan
            cur.execute(
                "INSERT INTO generations (id, prompt_id, model_name, text, params) SELECT $g + 2 * pos + $side, "
                f"prompt_id, model_{side}, text_{side}, params_{side} FROM {rows}",
                {"g": generation, "side": offset},
            )  # (one INSERT interleaving them through unnest() took three times as long)
        cur.execute(
            "INSERT INTO comparisons (id, prompt_id, generation_a, generation_b, annotator, choice, source, "
            "dedupe_key) SELECT $c + pos, prompt_id, $g + 2 * pos, $g + 2 * pos + 1, annotator, choice, $source, "
            f"key FROM {rows}",
            {"c": comparison, "g": generation, "source": source},
        )
        counts = cur.execute(f"SELECT count(DISTINCT prompt_hash), count(DISTINCT key) FROM {keys}").fetchall()[0]
        cur.execute("DROP TABLE bulk_prompts")
        cur.unregister(rows)
        cur.unregister(keys)
    return {"format": fmt, "prompts": int(counts[0]), "comparisons": int(counts[1])}


def _take(staged, numbers, columns: list[str]):
    """The staged rows with these row numbers (`n`, which is each row's place in the staged table), in this order."""
    table = staged.select(columns)
    if len(numbers) == len(staged) and numbers.equals(staged.column("n")):
        return table  # every row is new, in file order: nothing to copy
    return table.take(numbers)


def _ids(cur, rows: str | int, sequence: str, per_row: int) -> int:
    """Take `per_row` ids of `sequence` for each of `rows` (a count, or a table); the first of them (they are
    consecutive: every insert runs under the store's write lock, which this transaction holds)."""
    if isinstance(rows, str):
        rows = cur.execute(f"SELECT count(*) FROM {rows}").fetchall()[0][0]
    count = rows * per_row
    if count == 0:
        return 0
    first, last = cur.execute(
        f"SELECT min(v), max(v) FROM (SELECT nextval('{sequence}') AS v FROM range(?))", [count]
    ).fetchall()[0]
    if last - first != count - 1:
        raise RuntimeError(f"{sequence} handed out ids that are not consecutive")
    return int(first)

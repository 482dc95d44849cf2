"""Checks an import file must pass before a JSON reader sees it (how deep it nests, one object per line), and the SQL
macros and the hashing of the bulk importer's own checks and keys (storage/import_bulk.py).

pyarrow's JSON reader (the bulk importer) recurses once per nesting level and crashes the whole process (a
segfault: no exception to catch) on a line nested some thousands of levels deep, and it reads a line holding two
objects, or one object spread over several lines, where the row-by-row importer refuses that line. json.loads raises
RecursionError near 1,000 levels, and every recursive walk of a row after it would too. No dataset nests anywhere
near MAX_DEPTH (a chat is 3 levels: the row, its message list, a message), so a deeper row is refused by the
row-by-row importer and never handed to pyarrow. The scan runs on the bytes with numpy (no recursion, no Python
object per character): about 0.3 s per 100 MB, about what pyarrow's own read of them takes.
"""

from __future__ import annotations

from typing import Any

from storage.tallies import NOT_BLANK

MAX_DEPTH = 64  # nesting levels of one row, the row's own object being level 1

OPEN_OBJECT, OPEN_LIST, CLOSE_OBJECT, CLOSE_LIST, QUOTE, NEWLINE, BACKSLASH = 1, 2, 3, 4, 5, 6, 7
MARKED = b'{[}]"\n\\'  # the bytes of those kinds, in that order
_TABLE = bytes(MARKED.index(byte) + 1 if byte in MARKED else 0 for byte in range(256))
JSON_SPACE = b" \t\r"  # what may stand around a row's object on its line (\n ends the line)


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` nests lists and dicts more than `limit` levels (the value itself is level 1). No recursion."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return False


def _brackets(data: bytes):
    """(position, kind, depth after it, line index from 0) of each bracket outside the JSON strings, the newline
    positions and the bytes; None when a line holds a string that does not end on it (not valid JSON Lines), or when
    there is none of those bytes."""
    import numpy as np  # imported when needed, as in storage/import_bulk.py

    raw = np.frombuffer(data, np.uint8)
    kinds = np.frombuffer(data.translate(_TABLE), np.uint8)  # bytes.translate: ten times numpy's table lookup
    at = np.flatnonzero(kinds != 0)  # every byte that matters, in order (a bool mask: 5 times faster than uint8)
    if not len(at):
        return None  # no bracket, no quote, no newline: no JSON object either
    kind = kinds[at]
    quote = kind == QUOTE
    after = np.flatnonzero(quote & (np.append(0, kind[:-1]) == BACKSLASH) & (np.append(-2, at[:-1]) == at - 1))
    if len(after):  # a quote after an odd run of backslashes is part of a string
        slashes = np.flatnonzero(kind == BACKSLASH)
        runs = slashes[np.diff(at[slashes], prepend=-2) != 1]  # the event where each run of backslashes starts
        length = after - runs[np.searchsorted(runs, after, side="right") - 1]
        quote[after[length % 2 == 1]] = False
    quotes = np.cumsum(quote)  # real quotes up to each event
    newline = kind == NEWLINE
    if (quotes[newline] % 2).any() or quotes[-1] % 2:
        return None  # every line must hold whole strings: so the parity counts from the file's start
    lines = np.cumsum(newline)
    marks = (kind <= CLOSE_LIST) & (quotes % 2 == 0)
    kind = kind[marks]
    depth = np.cumsum(np.where(kind <= OPEN_LIST, 1, -1))
    return at[marks], kind, depth, lines[marks], at[newline], raw


def deep_line(data: bytes, limit: int = MAX_DEPTH) -> int | None:
    """The line (from 1) where the JSON text first nests over `limit` levels, if it does."""
    found = _brackets(data)
    if found is None:
        return None
    import numpy as np

    _, _, depth, lines, _, _ = found
    over = np.flatnonzero(depth > limit)
    return int(lines[over[0]]) + 1 if len(over) else None


def jsonl_layout_ok(data: bytes) -> bool:
    """Whether every line of this JSON Lines text is blank or holds one object alone, whole, at most MAX_DEPTH deep:
    only such a file may go to pyarrow's reader (anything else goes row by row, which names the line at fault)."""
    found = _brackets(data)
    if found is None:
        return False
    import numpy as np

    spots, kind, depth, lines, newlines, raw = found
    if not len(spots) or depth.min() < 0 or depth.max() > MAX_DEPTH:
        return False
    line_ends = np.append(np.flatnonzero(np.diff(lines)), len(lines) - 1)  # the last bracket of each line
    if depth[line_ends].any():  # a line whose brackets do not close on it
        return False
    opens = np.flatnonzero((depth == 1) & (kind <= OPEN_LIST))
    closes = np.flatnonzero(depth == 0)
    if (kind[opens] != OPEN_OBJECT).any() or (np.diff(lines[closes]) == 0).any():
        return False  # a row that is a list, or a line with two objects
    starts = np.append(0, newlines + 1)
    ends = np.append(newlines, len(data))
    lone = set(range(len(starts))) - set(lines[closes].tolist())
    if any(data[starts[n] : ends[n]].strip(JSON_SPACE) for n in lone):
        return False  # a line with no object on it that is not blank
    first, last, row_lines = spots[opens], spots[closes], lines[closes]
    end = ends[row_lines] - 1  # the line's last byte: the object's close, or a \r after it (a CRLF file)
    tidy = (first == starts[row_lines]) & ((last == end) | ((last == end - 1) & (raw[end] == ord("\r"))))
    return all(
        not data[starts[n] : a].strip(JSON_SPACE) and not data[b + 1 : ends[n]].strip(JSON_SPACE)
        for n, a, b in zip(row_lines[~tidy].tolist(), first[~tidy].tolist(), last[~tidy].tolist(), strict=True)
    )


# ---- for the bulk importer's SQL (storage/import_bulk.py) ----------------------------------------------------
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
    # coalesce per message: list_bool_and skips a NULL (a message without a role, or a NULL message) rather than fail
    """CREATE OR REPLACE TEMP MACRO messages_ok(ms) AS coalesce(len(ms) > 0
        AND list_bool_and(list_transform(ms, lambda m: coalesce(m.role IN ('system', 'user', 'assistant')
                                                                AND m.content IS NOT NULL, false))), false)""",
    """CREATE OR REPLACE TEMP MACRO prompt_ok(ms) AS coalesce(messages_ok(ms) AND ms[-1].role = 'user'
        AND not_blank(ms[-1].content), false)""",
    # a double to_json() writes as json.dumps does (Python's repr switches to an exponent outside [1e-4, 1e16))
    "CREATE OR REPLACE TEMP MACRO plain_double(x) AS isfinite(x) AND (x = 0 OR abs(x) >= 1e-4) AND abs(x) < 1e16",
]


def sha256_texts(texts):
    """The hex sha256 of each UTF-8 string of an Arrow string array, hashed straight from its buffers."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    digests = []
    for chunk in texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]:
        if len(chunk) == 0:
            continue
        if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            chunk = chunk.cast(pa.large_string())
        width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1].tolist()
        data = memoryview(chunk.buffers()[2] or b"")
        digests += [hashlib.sha256(data[a:b]).hexdigest() for a, b in zip(offsets, offsets[1:], strict=False)]
    return pa.array(digests, pa.string())

"""Importer edge cases: input that must fail with one clear error naming the line and write nothing, on the bulk path
(storage/import_bulk.py) and the row-by-row one alike, and the finer points of the formats."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from storage.db import Store
from storage.errors import ImportFailed
from storage.import_checks import MAX_DEPTH, jsonl_layout_ok
from storage.importers import import_file
from tests.test_import import arena_row, bot, judgements, prompts, table_counts, user, write_jsonl
from tests.test_import_bulk import both_ways, write

REPO = Path(__file__).resolve().parent.parent
GOOD = {"prompt": "Fine prompt.", "chosen": "Fine.", "rejected": "Meh."}
TOO_DEEP = f"is nested over {MAX_DEPTH} levels deep"


@pytest.fixture()
def store(db_url):
    store = Store(db_url)
    yield store
    store.close()


def refused(store, path: Path, expected: str, fmt: str = "auto") -> None:
    """The import fails with one line matching `expected`, and the store holds what it held before."""
    before = table_counts(store)
    with pytest.raises(ImportFailed, match=expected) as failure:
        import_file(store, path, fmt)
    assert "\n" not in str(failure.value) and len(str(failure.value)) < 1000
    assert table_counts(store) == before


def nested(depth: int, kind: str = "list") -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a": ' * depth + "1" + "}" * depth


# ---- nesting depth (pyarrow crashed, json.loads raised RecursionError) ---------------------------------------------
@pytest.mark.parametrize("kind", ["list", "object"])
def test_a_line_nested_100k_deep_is_refused_not_a_crash(tmp_path, kind):
    """pyarrow's JSON reader killed the process (a segfault) on this line; run in a child so a crash is a failure."""
    path, db = tmp_path / "deep.jsonl", tmp_path / "store.duckdb"
    deep = json.dumps({**GOOD, "prompt": "Other."})[:-1] + ', "meta": ' + nested(100_000, kind) + "}"
    path.write_text(f"{json.dumps(GOOD)}\n{deep}\n{json.dumps(GOOD)}\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "storage", "import", str(path), "--db", str(db)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.returncode  # before the fix: -11 (SIGSEGV)
    assert done.stderr.strip() == f"error: deep.jsonl, line 2: {TOO_DEEP} (lists and objects inside each other)"
    assert not db.exists()  # the import created it and removed it again: nothing written


def test_nesting_over_the_limit_is_refused_by_line_and_field(store, tmp_path):
    fine = {**GOOD, "meta": json.loads(nested(MAX_DEPTH - 2))}  # the row is level 1: MAX_DEPTH - 1 levels in all
    assert import_file(store, write_jsonl(tmp_path / "fine.jsonl", [fine]))["comparisons"] == 1
    deeper = {**GOOD, "prompt": "Other.", "meta": json.loads(nested(MAX_DEPTH))}
    path = write_jsonl(tmp_path / "meta.jsonl", [GOOD, deeper])
    refused(store, path, rf"meta\.jsonl, line 2: field 'meta' {TOO_DEEP}")
    recursion = '{"prompt": ' + nested(3000) + ', "chosen": "a", "rejected": "b"}'  # json.loads: RecursionError
    (tmp_path / "rec.jsonl").write_text(f"{json.dumps(GOOD)}\n{recursion}\n", encoding="utf-8")
    refused(store, tmp_path / "rec.jsonl", rf"rec\.jsonl, line 2: {TOO_DEEP}")
    (tmp_path / "rec.json").write_text(f"[{json.dumps(GOOD)},\n\n{recursion}]", encoding="utf-8")
    refused(store, tmp_path / "rec.json", rf"rec\.json, line 3: {TOO_DEEP}")


# ---- the bulk path refuses what the row-by-row path refuses --------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_chat_message_without_a_role_is_refused(store, tmp_path, suffix):
    """The bulk checks let a message with no role through (list_bool_and skips a NULL) and stored role ''."""
    rows = [arena_row("model_a", "j1"), arena_row("model_b", "j2")]
    for side in ("conversation_a", "conversation_b"):
        rows[1][side] = [{"content": "Be brief."}, *rows[1][side]]
    write(tmp_path / f"arena{suffix}", rows)
    where = "line 2" if suffix == ".jsonl" else "row 2"
    refused(store, tmp_path / f"arena{suffix}", rf"{where}: field 'conversation_a', message 1: needs a role")
    rows = [{"prompt": [user("Hi")], "chosen": [bot("Hello.")], "rejected": [bot("Go.")]} for _ in range(2)]
    rows[1]["prompt"] = [{"content": "Be brief."}, user("Hi")]
    write(tmp_path / f"trl{suffix}", rows)
    refused(store, tmp_path / f"trl{suffix}", rf"{where}: field 'prompt': message 1 needs a role")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"prompt": "One.", "chosen": "a", "rejected": "b"} {"prompt": "Two.", "chosen": "a", "rejected": "b"}',
         r"lines\.jsonl, line 2: is not valid JSON \(Extra data at column 52\)"),
        ('{"prompt": "One.", "chosen": "a",\n "rejected": "b"}',
         r"lines\.jsonl, line 2: is not valid JSON \(Expecting property name"),
    ],
    ids=["two objects on a line", "an object over two lines"],
)  # fmt: skip
def test_a_jsonl_line_must_hold_one_whole_object(store, tmp_path, text, expected):
    """pyarrow read both as rows, so the bulk path imported what the row-by-row path refuses."""
    path = tmp_path / "lines.jsonl"
    path.write_text(f"{json.dumps(GOOD)}\n{text}\n{json.dumps(GOOD)}\n", encoding="utf-8")
    refused(store, path, expected)


@pytest.mark.parametrize(
    "content, expected",
    [(b"", r"empty\.jsonl: the file is empty"), (b" \n\t\n", r"empty\.jsonl: the file is empty"),
     (b"just words", r"empty\.jsonl, line 1: is not valid JSON"), (b"{}\n", r"line 1: unknown shape")],
)  # fmt: skip
def test_jsonl_without_an_object_is_one_clear_error(store, tmp_path, content, expected):
    """The layout scan meets no bracket at all here: the row-by-row importer still says what is wrong."""
    (tmp_path / "empty.jsonl").write_bytes(content)
    refused(store, tmp_path / "empty.jsonl", expected)


def test_tricky_but_valid_jsonl_still_goes_in_bulk(tmp_path, monkeypatch):
    """Brackets, quotes and backslashes inside strings, CRLF endings, blank lines and spaces around a row."""
    rows = [{"prompt": f'Odd {i} [{{"\\\\"}}] \\" \\\\" \\\\\\" }} ] \u2028', "chosen": f"[{i}", "rejected": "{"}
            for i in range(5)]  # fmt: skip
    lines = [json.dumps(row, ensure_ascii=i % 2 == 0) for i, row in enumerate(rows)]
    path = tmp_path / "odd.jsonl"
    path.write_bytes(("\r\n".join(lines[:2]) + "\r\n\r\n  " + lines[2] + " \t\n\n" + "\n".join(lines[3:])).encode())
    assert jsonl_layout_ok(path.read_bytes())
    bulk, rows_stored, (_, used), _ = both_ways(tmp_path, monkeypatch, [(path, "auto")])
    assert used == [1] and bulk == rows_stored and len(bulk["comparisons"]) == 5


# ---- CSV, JSON, format detection ----------------------------------------------------------------------------------
def test_a_csv_row_with_more_values_than_columns_is_refused(store, tmp_path):
    """The values past the header's columns were dropped without a word."""
    path = tmp_path / "wide.csv"
    path.write_text('prompt,source\n"Say hi.",web\n"Name a river, please",web,extra,more\n', encoding="utf-8")
    refused(store, path, r"wide\.csv, line 3: the row has 4 values but the header names 2 columns$")


def test_a_json_file_must_hold_a_list(store, tmp_path):
    """A lone object was imported as one row, and {"data": [...]} unwrapped: the format is a list (or JSON Lines)."""
    (tmp_path / "one.json").write_text(json.dumps({"prompt": "Just me."}), encoding="utf-8")
    refused(store, tmp_path / "one.json", r"one\.json: holds one JSON object, not a list of rows")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"prompt": "Inside."}]}), encoding="utf-8")
    refused(store, tmp_path / "wrapped.json", r"wrapped\.json: holds one JSON object \(its 'data' holds a list\)")
    (tmp_path / "list.json").write_text(json.dumps([{"prompt": "Listed."}]), encoding="utf-8")
    assert import_file(store, tmp_path / "list.json")["prompts"] == 1


def test_a_file_mixing_formats_is_refused_not_read_as_its_first_row(store, tmp_path):
    """The first row alone chose the format: preference rows after a prompt-only row were imported as prompts."""
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "Say hi."}, {**GOOD, "prompt": "Name a colour."}])
    refused(store, mixed, r"mixed\.jsonl, line 2: this row is in format trl, but line 1 is in format prompts")
    talk = "\n\nHuman: Hi\n\nAssistant:"
    hh = {"prompt": "Hi", "chosen": f"{talk} Hello.", "rejected": f"{talk} Go."}
    path = write_jsonl(tmp_path / "hh.jsonl", [GOOD, GOOD, hh])  # a prompt column: the bulk path reads it
    refused(store, path, r"hh\.jsonl, line 3: this row is in format hh, but line 1 is in format trl")
    assert import_file(store, path, fmt="trl")["comparisons"] == 2  # named, the format reads every row
    assert import_file(store, mixed, fmt="prompts")["prompts"] == 2


# ---- formats -------------------------------------------------------------------------------------------------------
def test_trl_chat_prompt_with_text_answers_keeps_the_prompt(store, tmp_path):
    """The prompt was ignored and the answers' shared prefix ("The sky is") taken for it."""
    system = {"role": "system", "content": "Be brief."}
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": [system, user("Sky colour?")], "chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": [user("Grass colour?")], "chosen": "Green.", "rejected": [bot("Purple.")]},
    ])  # fmt: skip
    assert import_file(store, path) == {"format": "trl", "prompts": 2, "comparisons": 2}
    assert [(r["prompt"], r["a"], r["b"], r["choice"]) for r in judgements(store)] == [
        ([system, user("Sky colour?")], "The sky is blue.", "The sky is green.", "A"),
        ([user("Grass colour?")], "Green.", "Purple.", "A"),
    ]


def test_dolly_context_follows_the_instruction(store, tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Summarise this.", "context": "Rain falls.", "response": "Rain.", "category": "summarization"},
        {"instruction": "Name a bird.", "context": "", "response": "Crow.", "category": "open_qa"},
    ])  # fmt: skip
    assert import_file(store, path)["format"] == "prompts"
    assert prompts(store) == [[user("Summarise this.\n\nRain falls.")], [user("Name a bird.")]]


def test_ultrafeedback_equal_scores_are_a_tie(store, tmp_path):
    def row(question: str, chosen: float, rejected: float) -> dict:
        return {"prompt": question, "score_chosen": chosen, "score_rejected": rejected,
                "chosen": [user(question), bot("Good.")], "rejected": [user(question), bot("Bad.")]}  # fmt: skip

    path = write_jsonl(tmp_path / "uf.jsonl", [row("One?", 7.0, 7), row("Two?", 8.0, 3.0)])
    assert import_file(store, path)["comparisons"] == 2
    assert [r["choice"] for r in judgements(store)] == ["tie", "A"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_arena_dedupe_keys_stay_as_stored_before(tmp_path, monkeypatch, suffix):
    """The dedupe key is the first turn, both answers and models, the winner and the judge, on both paths: keys of
    files imported earlier stay valid (a key with the question id would import every earlier arena file again). Two
    battles identical in all of that are one judgement (known limit: later turns and question ids do not count)."""
    base = arena_row("model_a", "judge-1")
    base["conversation_a"] += [user("And?"), bot("More A.")]
    base["conversation_b"] += [user("And?"), bot("More B.")]
    other_battle = {**base, "question_id": "q-other"}
    legacy = {key: value for key, value in arena_row("tie", "judge-2").items() if key != "question_id"}
    rows = [base, other_battle, legacy]
    path = tmp_path / f"arena{suffix}"
    write(path, rows)
    bulk, by_rows, (_, used), _ = both_ways(tmp_path, monkeypatch, [(path, "auto")])
    assert used == [1] and bulk == by_rows
    assert len(bulk["comparisons"]) == 2
    for row, stored in zip([base, legacy], bulk["comparisons"], strict=True):
        key = [
            "arena",
            row["conversation_a"][:1],
            [
                [row["conversation_a"][1]["content"], row["model_a"]],
                [row["conversation_b"][1]["content"], row["model_b"]],
            ],
            "tie" if row is legacy else "A",
            row["judge"],
        ]
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        assert stored[-1] == digest  # dedupe_key, the last column

"""Importing prompt lists and preference datasets into a real DuckDB file: every format, every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.db import Store
from storage.errors import ImportFailed
from storage.importers import import_file


@pytest.fixture()
def store(db_url):
    store = Store(db_url)
    yield store
    store.close()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def table_counts(store) -> dict:
    with store.read() as cur:
        return {
            table: cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("prompts", "generations", "comparisons", "annotators")
        }


def judgements(store) -> list[dict]:
    """Every comparison with its prompt, both answers (and their model names), in id order."""
    with store.read() as cur:
        rows = cur.execute(
            "SELECT p.messages, ga.text, gb.text, ga.model_name, gb.model_name, c.choice, c.annotator, c.source, "
            "ga.params, p.source FROM comparisons c JOIN prompts p ON p.id = c.prompt_id "
            "JOIN generations ga ON ga.id = c.generation_a JOIN generations gb ON gb.id = c.generation_b ORDER BY c.id"
        ).fetchall()
    keys = ("prompt", "a", "b", "model_a", "model_b", "choice", "annotator", "source", "params_a", "prompt_source")
    out = [dict(zip(keys, row, strict=True)) for row in rows]
    for row in out:
        row["prompt"], row["params_a"] = json.loads(row["prompt"]), json.loads(row["params_a"])
    return out


def prompts(store) -> list[list[dict]]:
    with store.read() as cur:
        return [json.loads(m) for (m,) in cur.execute("SELECT messages FROM prompts ORDER BY id").fetchall()]


# ---- prompt lists -----------------------------------------------------------------------------------------
def test_txt_prompt_list_one_per_line(store, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffWhat is rain?\n\n  Name a river.  \r\nWhat is rain?\n".encode())  # BOM, CRLF, repeat
    assert import_file(store, path) == {"format": "txt", "prompts": 2, "comparisons": 0}
    assert prompts(store) == [[user("What is rain?")], [user("Name a river.")]]
    with store.read() as cur:
        assert cur.execute("SELECT DISTINCT source FROM prompts").fetchall() == [("import:txt",)]


def test_csv_prompt_column_with_quoted_newlines(store, tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text('id,prompt\n1,"Write a poem,\nplease."\n2,Say hi.\n', encoding="utf-8")
    assert import_file(store, path) == {"format": "csv", "prompts": 2, "comparisons": 0}
    assert prompts(store) == [[user("Write a poem,\nplease.")], [user("Say hi.")]]


def test_json_jsonl_and_parquet_prompt_columns_and_chats(store, tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello!"), user("Tell a joke."), bot("No.")]
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Sum", "input": "2 and 3"}, {"question": "Why?"}])
    (tmp_path / "b.json").write_text(json.dumps([{"text": "Plain text."}, {"messages": chat}]), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"prompt": "From parquet."}]), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        assert import_file(store, tmp_path / name)["format"] == "prompts"
    assert prompts(store) == [
        [user("Sum\n\n2 and 3")],
        [user("Why?")],
        [user("Plain text.")],
        chat[:4],  # the history is kept; the final assistant reply is not part of the prompt
        [user("From parquet.")],
    ]


# ---- preference datasets ------------------------------------------------------------------------------------
def test_trl_standard_conversational_explicit_and_implicit(store, tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": [user("Hi")], "chosen": [bot("Hello!")], "rejected": [bot("Go away.")]},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": [user("Q1"), bot("A1"), user("Q2"), bot("Good")],
         "rejected": [user("Q1"), bot("A1"), user("Q2"), bot("Bad")]},
    ])  # fmt: skip
    assert import_file(store, path) == {"format": "trl", "prompts": 4, "comparisons": 4}
    rows = judgements(store)
    assert [(r["prompt"], r["a"], r["b"]) for r in rows] == [
        ([user("Name a colour.")], "Blue.", "No."),
        ([user("Hi")], "Hello!", "Go away."),
        ([user("The sky is")], " blue.", " green."),  # the shared prefix is the prompt, as TRL cuts it
        ([user("Q1"), bot("A1"), user("Q2")], "Good", "Bad"),
    ]
    assert {(r["choice"], r["model_a"], r["model_b"], r["annotator"], r["source"]) for r in rows} == {
        ("A", "import:chosen", "import:rejected", "import:trl", "import:trl")
    }
    assert rows[0]["prompt_source"] == "import:trl"


def test_hh_multi_turn_transcripts(store, tmp_path):
    history = "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water, yeast.\n\nHuman: How long?"
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": history + "\n\nAssistant: About 40 minutes at 220 C.",
         "rejected": history + "\n\nAssistant: Dunno."},
        {"chosen": "Human: Hi there\n\nAssistant: Hello!", "rejected": "Human: Hi there\n\nAssistant:"},
    ])  # fmt: skip
    assert import_file(store, path) == {"format": "hh", "prompts": 2, "comparisons": 2}
    first, second = judgements(store)
    assert first["prompt"] == [user("How do I bake bread?"), bot("Flour, water, yeast."), user("How long?")]
    assert (first["a"], first["b"], first["choice"]) == ("About 40 minutes at 220 C.", "Dunno.", "A")
    assert (second["prompt"], second["a"], second["b"]) == ([user("Hi there")], "Hello!", "")


def test_ultrafeedback_binarized_keeps_scores(store, tmp_path):
    rows = [{"prompt": "Why is the sea salty?", "prompt_id": "x1", "score_chosen": 9.0, "score_rejected": 3.5,
             "chosen": [user("Why is the sea salty?"), bot("Rivers carry dissolved minerals.")],
             "rejected": [user("Why is the sea salty?"), bot("Fish cry.")]}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    assert import_file(store, tmp_path / "uf.parquet") == {"format": "ultrafeedback", "prompts": 1, "comparisons": 1}
    (row,) = judgements(store)
    assert (row["prompt"], row["a"], row["b"]) == ([user("Why is the sea salty?")], "Rivers carry dissolved minerals.",
                                                   "Fish cry.")  # fmt: skip
    assert row["params_a"]["score"] == 9.0 and row["annotator"] == "import:ultrafeedback"
    rows[0] |= {"prompt_id": "x2", "score_chosen": float("nan"), "score_rejected": float("inf"), "prompt": "Why?"}
    rows[0]["chosen"][0] = rows[0]["rejected"][0] = user("Why?")
    write_jsonl(tmp_path / "uf.jsonl", rows)  # as json.dumps writes them: NaN, Infinity
    assert import_file(store, tmp_path / "uf.jsonl")["comparisons"] == 1  # PostgreSQL's json refused NaN: no import
    assert judgements(store)[1]["params_a"]["score"] == "nan"


def arena_row(winner: str, judge: str, answer_a: str = "A says", answer_b: str = "B says") -> dict:
    return {"question_id": f"q-{winner}-{judge}", "model_a": "alpaca-13b", "model_b": "vicuna-13b",
            "winner": winner, "judge": judge, "turn": 1, "language": "English",
            "conversation_a": [user(f"Question for {winner}?"), bot(answer_a)],
            "conversation_b": [user(f"Question for {winner}?"), bot(answer_b)]}  # fmt: skip


def test_arena_models_judges_ties_and_both_bad(store, tmp_path):
    multi_a = [user("Plan a trip."), bot("Go to Rome."), user("Cheaper?"), bot("Try Porto.")]
    multi_b = [user("Plan a trip."), bot("Stay home."), user("Cheaper?"), bot("Still home.")]
    rows = [arena_row("model_a", "arena_user_1"), arena_row("model_b", "arena_user_2"),
            arena_row("tie", "expert_3"), arena_row("tie (bothbad)", "arena_user_1"),
            {**arena_row("model_a", "arena_user_4"), "conversation_a": multi_a,
             "conversation_b": multi_b}]  # fmt: skip
    (tmp_path / "arena.json").write_text(json.dumps(rows), encoding="utf-8")
    assert import_file(store, tmp_path / "arena.json") == {"format": "arena", "prompts": 5, "comparisons": 5}
    got = judgements(store)
    assert [(r["choice"], r["annotator"]) for r in got] == [
        ("A", "arena_user_1"), ("B", "arena_user_2"), ("tie", "expert_3"), ("both_bad", "arena_user_1"),
        ("A", "arena_user_4"),
    ]  # fmt: skip
    assert {(r["model_a"], r["model_b"], r["source"]) for r in got} == {("alpaca-13b", "vicuna-13b", "import:arena")}
    multi = got[-1]
    assert (multi["prompt"], multi["a"], multi["b"]) == ([user("Plan a trip.")], "Go to Rome.", "Stay home.")
    assert multi["params_a"]["continuation"] == multi_a[2:]  # later turns are kept, not dropped
    assert store.stats()["per_annotator"] == {"arena_user_1": 2, "arena_user_2": 1, "arena_user_4": 1, "expert_3": 1}


def test_shp_labels_both_ways(store, tmp_path):
    rows = [
        {
            "post_id": "p1",
            "domain": "askscience",
            "history": "Why is the sky blue?",
            "labels": 1,
            "human_ref_A": "Rayleigh scattering.",
            "human_ref_B": "Paint.",
            "score_A": 50,
            "score_B": 2,
        },
        {
            "post_id": "p2",
            "domain": "askscience",
            "history": "Why do cats purr?",
            "labels": 0,
            "human_ref_A": "They are robots.",
            "human_ref_B": "Contentment and healing.",
            "score_A": 1,
            "score_B": 30,
        },
    ]
    path = write_jsonl(tmp_path / "shp.jsonl", rows)  # fmt: skip
    assert import_file(store, path) == {"format": "shp", "prompts": 2, "comparisons": 2}
    first, second = judgements(store)
    assert (first["choice"], first["a"], first["params_a"]["score_A"]) == ("A", "Rayleigh scattering.", 50)
    assert (second["choice"], second["b"]) == ("B", "Contentment and healing.")
    assert (first["model_a"], first["model_b"], first["annotator"]) == ("import:human_ref_A", "import:human_ref_B",
                                                                        "import:shp")  # fmt: skip


def test_explicit_format_overrides_detection(store, tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}])
    assert import_file(store, path, fmt="prompts") == {"format": "prompts", "prompts": 1, "comparisons": 0}
    assert table_counts(store)["comparisons"] == 0


def test_reimport_adds_nothing(store, tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},  # the same row twice in one file
        {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Rock."},
    ])  # fmt: skip
    first = import_file(store, path)
    after_first = table_counts(store)
    assert after_first == {"prompts": 2, "generations": 4, "comparisons": 2, "annotators": 1}
    assert import_file(store, path) == first == {"format": "trl", "prompts": 2, "comparisons": 2}
    assert table_counts(store) == after_first


# ---- bad input: one clear error, nothing written ------------------------------------------------------------
HUGE = "x" * 10_000_000  # a 10 MB field, ten times the limit


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """name: (file, format, the error expected)."""
    good = {"prompt": "Fine prompt.", "chosen": "Fine.", "rejected": "Meh."}
    cases = {
        "unknown shape": (write_jsonl(tmp_path / "shape.jsonl", [{"foo": 1, "bar": 2}]), "auto",
                          r"shape\.jsonl, line 1: unknown shape: columns found: foo, bar; formats known: .*arena"),
        "truncated json": (tmp_path / "cut.jsonl", "auto", r"cut\.jsonl, line 2: is not valid JSON"),
        "truncated json array": (tmp_path / "cut.json", "auto", r"cut\.json, line 3: is not valid JSON"),
        "wrong encoding": (tmp_path / "latin.csv", "auto",
                           r"latin\.csv, line 3: is not UTF-8 text \(byte \d+ is 0xe9"),
        "empty file": (tmp_path / "empty.txt", "auto", r"empty\.txt: the file is empty"),
        "no rows": (tmp_path / "none.json", "auto", r"none\.json: no rows to import"),
        "missing file": (tmp_path / "absent.jsonl", "auto", r"absent\.jsonl: no such file"),
        "10 MB field": (write_jsonl(tmp_path / "big.jsonl", [good, good, {**good, "chosen": HUGE}]), "auto",
                        r"big\.jsonl, line 3: field 'chosen' is over 1,000,000 characters"),
        "10 MB csv field": (tmp_path / "big.csv", "auto", r"big\.csv, line 2: field 'prompt' is over 1,000,000"),
        "not parquet": (tmp_path / "junk.parquet", "auto", r"junk\.parquet: is not a readable parquet file"),
        "bad role": (write_jsonl(tmp_path / "role.jsonl", [good, {"messages": [{"role": "robot", "content": "x"}]}]),
                     "prompts", r"role\.jsonl, line 2: field 'messages', message 1: needs a role"),
        "bad winner": (write_jsonl(tmp_path / "win.jsonl", [{**arena_row("model_a", "j"), "winner": "both"}]), "auto",
                       r"win\.jsonl, line 1: field 'winner' is 'both'"),
        "bad label": (write_jsonl(tmp_path / "shp.jsonl", [{"history": "h", "human_ref_A": "a", "human_ref_B": "b",
                                                             "labels": 7}]), "auto", r"line 1: field 'labels' is 7"),
        "format mismatch": (write_jsonl(tmp_path / "fmt.jsonl", [good, {"prompt": "x"}]), "trl",
                            r"fmt\.jsonl, line 2: missing column 'chosen', 'rejected' for format trl"),
        "txt as trl": (tmp_path / "lines.txt", "hh", r"lines\.txt, line 1: format hh needs an object"),
        "unsupported type": (tmp_path / "data.xlsx", "auto", r"data\.xlsx: unsupported file type '\.xlsx'"),
        "unknown format": (write_jsonl(tmp_path / "ok.jsonl", [good]), "yaml", r"ok\.jsonl: unknown format 'yaml'"),
        "hh not a transcript": (write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "just text", "rejected": "x"}]),
                                "hh", r"hh\.jsonl, line 1: field 'chosen' must be a transcript"),
        "lone surrogate": (write_jsonl(tmp_path / "sur.jsonl", [good, {**good, "chosen": "ok \ud800"}]), "auto",
                           r"sur\.jsonl, line 2: field 'chosen' holds a character that is not valid Unicode"),
        "number as prompt": (tmp_path / "nums.json", "auto",
                             r"nums\.json, item 2: a prompt row must be a line of text or an object, found int"),
        "null value": (write_jsonl(tmp_path / "null.jsonl", [good, {**good, "chosen": None}]), "auto",
                       r"null\.jsonl, line 2: column 'chosen' is empty \(null\) for format trl$"),
        "a directory": (tmp_path / "folder.jsonl", "auto", r"folder\.jsonl: is a directory, not a file"),
        "same answers (bulk)": (write_jsonl(tmp_path / "same.jsonl", [good, {**good, "rejected": "Fine."}]), "auto",
                                r"same\.jsonl, line 2: 'chosen' and 'rejected' are the same text"),
        "same answers (rows)": (tmp_path / "same.json", "auto",
                                r"same\.json, item 2: 'chosen' and 'rejected' are the same text"),
        "same chat answers": (tmp_path / "same.parquet", "auto",
                              r"same\.parquet, row 1: 'chosen' and 'rejected' are the same text"),
    }  # fmt: skip
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "same.json").write_text(json.dumps([good, {**good, "rejected": "Fine."}]), encoding="utf-8")
    same_chat = {"prompt": [user("Hi")], "chosen": [bot("Hello.")], "rejected": [bot("Hello.")]}
    pq.write_table(pa.Table.from_pylist([same_chat]), tmp_path / "same.parquet")
    (tmp_path / "cut.jsonl").write_text(json.dumps(good) + '\n{"prompt": "Name a colour.", "chosen": "Blue."\n')
    (tmp_path / "cut.json").write_text('[\n{"prompt": "a"},\n{"prompt": "b"', encoding="utf-8")
    (tmp_path / "latin.csv").write_bytes("prompt\nfine\ncaf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "none.json").write_text("[]", encoding="utf-8")
    (tmp_path / "big.csv").write_text(f"prompt\n{HUGE}\n", encoding="utf-8")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "lines.txt").write_text("a prompt\n", encoding="utf-8")
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    (tmp_path / "nums.json").write_text('[\n"hello",\n5\n]', encoding="utf-8")
    return cases


BAD_CASES = ["unknown shape", "truncated json", "truncated json array", "wrong encoding", "empty file", "no rows",
             "missing file", "10 MB field", "10 MB csv field", "not parquet", "bad role", "bad winner", "bad label",
             "format mismatch", "txt as trl", "unsupported type", "unknown format", "hh not a transcript",
             "lone surrogate", "number as prompt", "null value", "a directory", "same answers (bulk)",
             "same answers (rows)", "same chat answers"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_error_and_writes_nothing(store, tmp_path, case):
    import_file(
        store, write_jsonl(tmp_path / "seed.jsonl", [{"prompt": "Seed.", "chosen": "Yes.", "rejected": "No."}])
    )
    before = table_counts(store)
    path, fmt, expected = bad_files(tmp_path)[case]
    with pytest.raises(ImportFailed, match=expected) as failure:
        import_file(store, path, fmt=fmt)
    message = str(failure.value)
    assert "\n" not in message and len(message) < 1000  # one line, never the 10 MB value
    assert table_counts(store) == before


def test_a_failure_while_writing_rolls_back_the_whole_file(store, tmp_path):
    """A real constraint failure on the last insert (comparisons): the prompts and generations vanish too."""
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "One?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Two?", "chosen": "Yes.", "rejected": "No."},
    ])  # fmt: skip
    with store.transaction() as cur:  # squat on the id the import's first comparison will get
        squatted = cur.execute("SELECT nextval('comparisons_id_seq')").fetchone()[0] + 1
        cur.execute(
            "INSERT INTO comparisons (id, prompt_id, generation_a, generation_b, annotator, choice, source) "
            "VALUES (?, 0, 0, 0, 'squatter', 'skip', 'test')",
            [squatted],
        )
    before = table_counts(store)
    with pytest.raises(ImportFailed, match=r"trl\.jsonl: could not be stored \(.*[Cc]onstraint"):
        import_file(store, path)
    assert table_counts(store) == before
    assert import_file(store, path)["comparisons"] == 2  # the store is fine afterwards (the sequence moved on)
    assert table_counts(store)["comparisons"] == before["comparisons"] + 2


def test_prompts_match_those_stored_through_the_store_api(store, tmp_path):
    """The bulk writer hashes prompts exactly as Store.add_prompt does: no duplicate prompt rows."""
    first = store.add_prompt("Name a colour.", "ui")
    second = store.add_prompt([{"role": "system", "content": "Be kind."}, user("Hi")], "ui")
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": [{"role": "system", "content": "Be kind."}, user("Hi")], "chosen": [bot("Hello!")],
         "rejected": [bot("Go.")]},
    ])  # fmt: skip
    import_file(store, path)
    assert table_counts(store)["prompts"] == 2
    with store.read() as cur:
        assert [r[0] for r in cur.execute("SELECT prompt_id FROM comparisons ORDER BY id").fetchall()] == [
            first,
            second,
        ]

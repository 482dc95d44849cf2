"""Exports from a real DuckDB file: exact rows per format, datasets round trips, and a DPO export that trains."""

from __future__ import annotations

import json

import pytest
from datasets import load_dataset

from storage.db import Store
from storage.exporters import export, export_rows


@pytest.fixture()
def store(db_url):
    store = Store(db_url)
    yield store
    store.close()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def judge(store, n: int, a: str, b: str, choice: str, edited: str | None = None, supersedes: int | None = None) -> int:
    """One judgement on prompt `Prompt n` through the real store API; returns the comparison id."""
    prompt = store.add_prompt(f"Prompt {n}", "test")
    gen_a = store.add_generation(prompt, a, model_version_id=0)
    gen_b = store.add_generation(prompt, b, model_version_id=0)
    return store.add_comparison(prompt_id=prompt, generation_a=gen_a, generation_b=gen_b, annotator="ann",
                                choice=choice, edited_answer=edited, supersedes=supersedes, source="test")  # fmt: skip


def seed_mixed(store) -> dict[str, int]:
    ids = {
        "A": judge(store, 1, "Good 1", "Bad 1", "A"),
        "B": judge(store, 2, "Bad 2", "Good 2", "B"),
        "tie": judge(store, 3, "Same 3", "Same-ish 3", "tie"),
        "both_bad": judge(store, 4, "Awful 4", "Worse 4", "both_bad"),
        "edited_A": judge(store, 5, "Okay 5", "Weak 5", "A", edited="Edited 5"),
        "edited_both_bad": judge(store, 6, "Poor 6", "Dull 6", "both_bad", edited="Edited 6"),
        "undone": judge(store, 7, "Gone 7", "Gone too 7", "A"),
        "skip": judge(store, 8, "Skip 8", "Skip too 8", "skip"),
        "wrong": judge(store, 9, "Left 9", "Right 9", "A"),
    }
    store.undo_comparison(ids["undone"], "ann")
    with store.read() as cur:
        prompt, gen_a, gen_b = cur.execute(
            "SELECT prompt_id, generation_a, generation_b FROM comparisons WHERE id = ?", [ids["wrong"]]
        ).fetchone()
    ids["corrected"] = store.add_comparison(prompt_id=prompt, generation_a=gen_a, generation_b=gen_b, annotator="ann",
                                            choice="B", supersedes=ids["wrong"], source="test")  # fmt: skip
    return ids


def test_dpo_and_reward_rows(store):
    seed_mixed(store)
    expected = [
        (1, "Good 1", "Bad 1"),
        (2, "Good 2", "Bad 2"),
        (5, "Okay 5", "Weak 5"),
        (5, "Edited 5", "Okay 5"),  # an edited answer beats both originals
        (5, "Edited 5", "Weak 5"),
        (6, "Edited 6", "Poor 6"),
        (6, "Edited 6", "Dull 6"),
        (9, "Right 9", "Left 9"),  # the correction counts, the superseded vote does not
    ]
    rows = [
        {"prompt": user(f"Prompt {n}"), "chosen": reply(good), "rejected": reply(bad)} for n, good, bad in expected
    ]
    assert export_rows(store, "dpo") == rows
    assert export_rows(store, "reward") == rows


def test_with_ids_names_the_comparison_of_each_row(store):
    ids = seed_mixed(store)
    got = [row["comparison_id"] for row in export_rows(store, "dpo", with_ids=True)]
    edited, both_bad = ids["edited_A"], ids["edited_both_bad"]
    assert got == [ids["A"], ids["B"], edited, edited, edited, both_bad, both_bad, ids["corrected"]]


def test_kto_rows(store):
    seed_mixed(store)
    expected = [(1, "Good 1", True), (1, "Bad 1", False), (2, "Good 2", True), (2, "Bad 2", False),
                (4, "Awful 4", False), (4, "Worse 4", False),  # both-bad: two undesirable rows; the tie gives none
                (5, "Edited 5", True), (5, "Okay 5", False), (5, "Weak 5", False),
                (6, "Edited 6", True), (6, "Poor 6", False), (6, "Dull 6", False),
                (9, "Right 9", True), (9, "Left 9", False)]  # fmt: skip
    assert export_rows(store, "kto") == [
        {"prompt": user(f"Prompt {n}"), "completion": reply(text), "label": label} for n, text, label in expected
    ]


def test_sft_rows_are_edits_and_clear_winners(store):
    seed_mixed(store)
    expected = [(1, "Good 1"), (2, "Good 2"), (5, "Edited 5"), (6, "Edited 6"), (9, "Right 9")]
    assert export_rows(store, "sft") == [{"prompt": user(f"Prompt {n}"), "completion": reply(t)} for n, t in expected]


def test_raw_has_every_comparison_with_texts(store):
    ids = seed_mixed(store)
    rows = export_rows(store, "raw")
    assert len(rows) == len(ids) + 1  # every row of the table, including the undo row
    assert [row["choice"] for row in rows].count("undone") == 1
    skip = next(row for row in rows if row["id"] == ids["skip"])
    assert (skip["prompt"], skip["answer_a"], skip["answer_b"], skip["model_a"]) == (user("Prompt 8"), "Skip 8",
                                                                                      "Skip too 8", "v0")  # fmt: skip
    assert {"edited_answer", "supersedes", "dedupe_key", "created_at", "time_spent_s", "rationale"} <= set(rows[0])


def test_raw_names_an_imported_model_called_v1_apart_from_version_1(store):
    """An imported judgement between models named "v1" and "gpt-x": the raw export called the first "v1", the
    name of this app's version 1; it says "v1 (external)", as the leaderboard and the Data tab do."""
    prompt = store.add_prompt([{"role": "user", "content": "Hi"}], "import")
    a = store.add_generation(prompt, "Hello", model_name="v1")
    b = store.add_generation(prompt, "Hey", model_name="gpt-x")
    local = store.add_generation(prompt, "Hi there", model_version_id=0)
    store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="t", choice="A", source="t")
    store.add_comparison(prompt_id=prompt, generation_a=local, generation_b=b, annotator="t", choice="B", source="t")
    rows = export_rows(store, "raw")
    assert [(row["model_a"], row["model_b"]) for row in rows] == [("v1 (external)", "gpt-x"), ("v0", "gpt-x")]


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt", ["dpo", "reward", "kto", "sft", "raw"])
def test_every_export_loads_with_datasets(store, tmp_path, fmt, ext):
    seed_mixed(store)
    out = tmp_path / f"export-{fmt}{ext}"
    assert export(store, fmt, out) == len(export_rows(store, fmt))
    loader = "json" if ext == ".jsonl" else "parquet"
    dataset = load_dataset(loader, data_files=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    if fmt == "raw":
        raw = export_rows(store, "raw")
        assert dataset.num_rows == len(raw) and set(dataset.column_names) == set(raw[0])
        assert dataset["choice"] == [row["choice"] for row in raw]
    else:
        assert dataset.to_list() == export_rows(store, fmt)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_empty_store_exports_an_empty_file_with_its_columns(store, tmp_path):
    """Zero rows is a valid export (datasets itself refuses to load a 0-row file; pyarrow reads it)."""
    import pyarrow.parquet as pq

    assert export(store, "dpo", tmp_path / "empty.jsonl") == 0
    assert (tmp_path / "empty.jsonl").read_text() == ""
    assert export(store, "kto", tmp_path / "empty.parquet") == 0
    table = pq.read_table(tmp_path / "empty.parquet")
    assert table.num_rows == 0 and table.column_names == ["prompt", "completion", "label"]


def test_bad_format_or_extension_is_refused_and_writes_nothing(store, tmp_path):
    seed_mixed(store)
    with pytest.raises(ValueError, match=r"unknown export format 'csv'; choose one of dpo, reward, kto, sft, raw"):
        export(store, "csv", tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match=r"cannot export to 'out.csv': the file name must end in .jsonl or .parquet"):
        export(store, "dpo", tmp_path / "out.csv")
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_export_replaces_an_old_file_whole(store, tmp_path):
    out = tmp_path / "dpo.jsonl"
    out.write_text("old content\n")
    seed_mixed(store)
    assert export(store, "dpo", out) == 8
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["chosen"] == reply("Good 1")


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_nothing(store, tmp_path, ext):
    """The file is written on a thread of its own while DuckDB builds the next rows: a write the system refuses
    halfway (here the file-size limit, as a full disk would) fails the export, not the writer thread silently."""
    import random
    import resource
    import signal
    import string

    for n in range(40):  # ≈ 4 MB of rows that do not compress (parquet): more than the limit below
        judge(store, 100 + n, "".join(random.Random(n).choices(string.ascii_letters, k=100_000)), f"{n} short", "A")
    out = tmp_path / f"dpo{ext}"
    out.write_text("old content\n")
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, limits[1]))  # a write past 1 MB: EFBIG, not a kill
    try:
        with pytest.raises(OSError):
            export(store, "dpo", out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert out.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir() if "dpo" in p.name] == [out.name]  # no part file left
    assert export(store, "dpo", out) == 40  # and the next export works


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_an_export_file_honours_the_umask_as_open_does(store, tmp_path, mask):
    """Not the 0600 of a private temp file: 0666 less the umask, like any file the process writes."""
    import os
    import stat

    seed_mixed(store)
    folder = tmp_path / "exports"  # the store's file may be in tmp_path
    folder.mkdir()
    names = {"dpo.jsonl": "dpo", "dpo.parquet": "dpo", "kto.jsonl": "kto", "raw.parquet": "raw"}
    old = os.umask(mask)
    try:
        written = {name: export(store, fmt, folder / name) for name, fmt in names.items()}
        (folder / "plain.txt").write_text("made by open()")
    finally:
        os.umask(old)
    assert all(written.values())
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert modes == dict.fromkeys([*written, "plain.txt"], 0o666 & ~mask)  # and no temp file is left


def test_dpo_export_trains_with_trl_as_is(store, tmp_path, tiny_model_dir):
    """A dpo export goes straight into trl's DPOTrainer: 2 LoRA steps on the tiny model change the adapter."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    seed_mixed(store)
    out = tmp_path / "dpo.jsonl"
    export(store, "dpo", out)
    dataset = load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = DPOConfig(output_dir=str(tmp_path / "dpo-run"), use_cpu=True, report_to="none", max_length=64,
                       per_device_train_batch_size=2, max_steps=2, save_strategy="no", learning_rate=1e-2,
                       logging_steps=1)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_B" in name}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and all(not torch.equal(before[name], after[name].detach()) for name in before)
    assert trainer.state.global_step == 2


def test_a_trl_import_exports_back_to_the_same_dpo_rows(store, tmp_path):
    from storage.importers import import_file

    rows = [
        {"prompt": user("Name a colour."), "chosen": reply("Blue."), "rejected": reply("No.")},
        {"prompt": [*user("Hi"), *reply("Hello!"), *user("Joke?")], "chosen": reply("Knock knock."),
         "rejected": reply("No.")},
    ]  # fmt: skip
    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    import_file(store, path)
    assert export_rows(store, "dpo") == rows


def test_the_app_deletes_its_exports_after_an_hour(monkeypatch, tmp_path):
    """Each Data-tab export is a whole copy of the judgements in a temp folder: those older than the hour an export
    stays downloadable are deleted at the next export, newer ones and other folders are left."""
    import os
    import time

    from ui.data_tab import EXPORT_KEEP_S, EXPORT_PREFIX, prune_exports

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile reads TMPDIR again
    old, new, other = tmp_path / f"{EXPORT_PREFIX}old", tmp_path / f"{EXPORT_PREFIX}new", tmp_path / "someone-else"
    for folder in (old, new, other):
        folder.mkdir()
        (folder / "prefloop-raw.jsonl").write_text("{}\n")
    hours_ago = time.time() - 2 * EXPORT_KEEP_S
    for folder in (old, other):
        os.utime(folder, (hours_ago, hours_ago))
    assert prune_exports(EXPORT_KEEP_S) == 1
    assert not old.exists() and new.exists() and other.exists()


def exported(store, fmt: str, tmp_path) -> list[dict]:
    """The rows of a written export (dpo / reward: built by DuckDB's SQL, not by _pair_rows), read back."""
    out = tmp_path / f"{fmt}.jsonl"
    export(store, fmt, out)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_an_edit_equal_to_an_original_but_for_whitespace_is_no_edit(store, tmp_path):
    """An edit equal to an original after stripping made a pair of an answer with itself, the clear pair twice, and
    in kto an answer both desirable and undesirable."""
    judge(store, 1, "Good 1\n", "Bad 1", "A", edited="  Good 1 ")  # edited back to the winner
    judge(store, 2, "Poor 2", "Dull 2", "both_bad", edited="Dull 2\u3000")  # "edited" to one of two bad answers
    judge(store, 3, "Same 3", "Same 3 ", "A", edited="New 3")  # two answers that differ only in whitespace
    pairs = [{"prompt": user("Prompt 1"), "chosen": reply("Good 1\n"), "rejected": reply("Bad 1")},
             {"prompt": user("Prompt 3"), "chosen": reply("New 3"), "rejected": reply("Same 3")}]  # fmt: skip
    for fmt in ("dpo", "reward"):
        assert export_rows(store, fmt) == pairs
        assert exported(store, fmt, tmp_path) == pairs
    kto = [(1, "Good 1\n", True), (1, "Bad 1", False), (2, "Poor 2", False), (2, "Dull 2", False),
           (3, "New 3", True), (3, "Same 3", False)]  # fmt: skip
    assert export_rows(store, "kto") == [
        {"prompt": user(f"Prompt {n}"), "completion": reply(text), "label": label} for n, text, label in kto
    ]
    sft = [(1, "Good 1\n"), (3, "New 3")]  # prompt 2 has no winner and no real edit
    assert export_rows(store, "sft") == [{"prompt": user(f"Prompt {n}"), "completion": reply(t)} for n, t in sft]


def test_a_vote_whose_edit_repeats_an_answer_stores_no_edit(tmp_path, engine):
    """Through the real vote path: the page strips the edit, so an unchanged answer ("Good\n" on screen) became an
    edit "Good" that differed from it and was counted and exported as a pair of the answer with itself."""
    from generation.sampling import Generation, SamplingParams
    from labeling.pair_queue import PairQueue
    from labeling.services import Services
    from storage.tallies import usable_pairs

    store = Store(tmp_path / "votes.duckdb")
    queue = PairQueue(store, engine, params=SamplingParams(max_new_tokens=4))
    services = Services(store, engine, queue, None)

    def pair(a: str, b: str) -> int:
        answers = [Generation(text, 3, 1.0, SamplingParams(seed=i), 0) for i, text in enumerate((a, b))]
        return queue.add_own_pair("ann", user(f"Question about {a}?"), *answers)["pair_id"]

    kept_as_is = services.vote(pair("Good answer.\n", "Bad."), "ann", "A", edited="  Good answer.  ")
    real_edit = services.vote(pair("Fine.", "Worse."), "ann", "A", edited=" Much better answer. ")
    with store.read() as cur:
        edits = dict(cur.execute("SELECT id, edited_answer FROM comparisons").fetchall())
    assert edits == {kept_as_is: None, real_edit: "Much better answer."}
    rows = export_rows(store, "dpo")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("Good answer.\n", "Bad."), ("Fine.", "Worse."), ("Much better answer.", "Fine."),
        ("Much better answer.", "Worse."),
    ]  # fmt: skip
    assert usable_pairs(store) == len(rows) == len(exported(store, "dpo", tmp_path))
    store.close()

"""The training child's file helpers without any model: JSON lines, atomic writes, rows and the held-out split."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from training.data import DataError, eval_count, load_rows, split_rows
from training.files import json_safe, replacing, write_json, write_jsonl
from training.progress import ProgressWriter

REPO = Path(__file__).resolve().parent.parent


def test_write_jsonl_replaces_the_whole_file_and_reads_back(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    write_jsonl(path, [{"a": 1}, {"b": "ü"}])
    write_jsonl(path, [{"prompt": "p", "when": Path("x")}])  # a value JSON cannot hold is written as text
    assert load_rows(path) == [{"prompt": "p", "when": "x"}]
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # the temp file was renamed


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("broken source")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    with pytest.raises(OSError), replacing(path) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert load_rows(path) == [{"a": 1}] and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_append_adds_lines(tmp_path):
    path = tmp_path / "run" / "progress.jsonl"
    write_jsonl(path, [{"event": "start"}], append=True)
    write_jsonl(path, [{"event": "progress"}, {"event": "end"}], append=True)
    assert [r["event"] for r in load_rows(path)] == ["start", "progress", "end"]


def test_progress_writer_lines_are_json_safe(tmp_path, capsys):
    writer = ProgressWriter(tmp_path)
    line = writer.progress(step=1, loss=float("nan"), extra=(1.5, float("inf")))
    writer.end("succeeded", {"loss": 0.5})
    lines = [json.loads(text) for text in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert lines[0] == line and line["loss"] is None and line["extra"] == [1.5, None]
    assert lines[1]["event"] == "end" and lines[1]["metrics"] == {"loss": 0.5} and lines[1]["error"] is None
    assert capsys.readouterr().out.startswith("[progress] {")


def test_write_json_and_json_safe(tmp_path):
    write_json(tmp_path / "m.json", {"a": math.nan, 1: [2.0]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "1": [2.0]}
    assert json_safe({"x": (1, -math.inf)}) == {"x": [1, None]}


def test_load_rows_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(DataError, match=r"rows.jsonl, line 3: invalid JSON"):
        load_rows(path)


def test_method_modules_and_help_need_no_torch():
    """--help and config errors of every method answer without importing torch or transformers."""
    code = (
        "import sys, training.dpo, training.reward, training.ppo, training.score, training.runner; "
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr[-2000:]
    for method in ("dpo", "reward", "ppo", "score"):
        cmd = [sys.executable, "-m", "training", method, "--help"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "--learning-rate" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("n_rows", "fraction", "held"),
    [
        (40, 0.0, 0),  # fraction 0: no split
        (3, 0.5, 0),  # under MIN_ROWS_FOR_EVAL rows: all train
        (4, 0.1, 1),  # 0.4 rounds to 0, but a fraction above 0 holds out at least one row
        (8, 0.25, 2),
        (12, 0.1, 1),  # 1.2 → 1
        (40, 0.1, 4),
        (15, 0.1, 2),  # 1.5: halves round up
        (25, 0.1, 3),  # 2.5 → 3 (Python's round() would give 2)
        (45, 0.7, 32),  # 31.499999999999996 in floats, counted as 31.5 → 32
        (4, 0.99, 3),  # 3.96 → 4, capped so one row is left to train on
    ],
)
def test_one_held_out_rule(n_rows, fraction, held):
    assert eval_count(n_rows, fraction) == held
    rows = [{"i": i} for i in range(n_rows)]
    train, evaluation = split_rows(rows, fraction, seed=3)
    assert len(evaluation) == held and len(train) == n_rows - held
    assert sorted(train + evaluation, key=lambda r: r["i"]) == rows
    assert train == sorted(train, key=lambda r: r["i"]) and evaluation == sorted(evaluation, key=lambda r: r["i"])


def test_split_is_seeded_and_shared_by_every_method():
    from training import dpo, reward

    rows = list(range(20))
    assert split_rows(rows, 0.25, seed=1) == split_rows(rows, 0.25, seed=1)
    assert split_rows(rows, 0.25, seed=1) != split_rows(rows, 0.25, seed=2)
    assert dpo.split_rows is reward.split_rows is split_rows


def test_rows_of_one_prompt_are_held_out_together():
    """An edited vote exports the edit over each original (same prompt, same chosen answer): split row by row, one
    could train while its twin was held out, and the held-out accuracy came out too good."""
    rows = [{"prompt": f"p{i // 3}", "chosen": f"c{i // 3}", "rejected": f"r{i}"} for i in range(30)]  # 3 per prompt
    for seed in range(5):
        train, evaluation = split_rows(rows, 0.25, seed=seed)
        assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in evaluation)
        assert len(evaluation) >= eval_count(30, 0.25) and len(train) + len(evaluation) == 30
    assert split_rows([{"prompt": "one"}] * 8, 0.25, seed=1) == ([{"prompt": "one"}] * 8, [])  # nothing left to train


def test_planned_steps_round_up_as_the_trainer_does():
    """5 batches with 2 accumulation steps are 3 optimizer steps an epoch (the Trainer rounds up): counting 2 left the
    learning-rate cap (full_rate_steps) applied too late."""
    from training.dpo import PrefDPOConfig, planned_steps

    cfg = PrefDPOConfig(data="x.jsonl", out="o", batch_size=4, gradient_accumulation_steps=2, epochs=2)
    assert planned_steps(cfg, 20) == 6


def test_held_out_rows_stay_near_the_fraction_with_uneven_prompts(capsys):
    """Whole prompts were taken until the target was reached: one prompt with many rows drawn first held out 60 %
    for a 20 % fraction."""
    rows = [{"prompt": "big", "i": i} for i in range(6)] + [{"prompt": f"p{i}", "i": 6 + i} for i in range(4)]
    for seed in range(20):
        train, evaluation = split_rows(rows, 0.2, seed=seed)
        assert len(evaluation) == 2 and len(train) == 8, seed  # two one-row prompts, never the six-row one
    import random

    for seed in range(200):  # any mix of prompt sizes: at most twice the target, a row always left to train on
        rng = random.Random(seed)
        rows = [{"prompt": f"p{rng.randrange(12)}"} for _ in range(rng.randrange(4, 40))]
        fraction = rng.choice([0.05, 0.1, 0.25, 0.5])
        train, evaluation = split_rows(rows, fraction, seed=seed)
        assert len(evaluation) <= 2 * eval_count(len(rows), fraction) and train, (seed, len(rows), fraction)


def test_a_split_that_cannot_hold_out_a_row_says_so(capsys):
    """Two prompts of five rows, 10 % asked: holding out a prompt is 50 %; that happened silently."""
    rows = [{"prompt": "a"}] * 5 + [{"prompt": "b"}] * 5
    train, evaluation = split_rows(rows, 0.1, seed=1)
    assert (len(train), len(evaluation)) == (10, 0)
    assert "note: eval_fraction 0.1: nothing held out — 1 of 10 rows was the target" in capsys.readouterr().out
    split_rows([{"prompt": "a"}] * 3, 0.5, seed=1)
    assert "nothing held out (fewer than 4 rows)" in capsys.readouterr().out
    split_rows([{"prompt": f"p{i}"} for i in range(8)], 0.25, seed=1)  # exactly the target: nothing to say
    assert capsys.readouterr().out == ""


def test_eval_fraction_help_is_what_the_split_does():
    from training.common import CommonConfig
    from training.configparse import build_parser

    text = " ".join(build_parser(CommonConfig).format_help().split())
    assert "as near it as whole prompts allow (at most twice it" in text and "≥ 1 row from 4 rows on" not in text

"""Reading a growing run folder: progress lines parsed once each, the log tail read from the end of the file."""

from __future__ import annotations

import json
import os

from training.run_folder import end_event, log_tail, read_progress


def test_progress_is_read_as_it_grows_and_again_when_replaced(tmp_path):
    path = tmp_path / "progress.jsonl"
    assert read_progress(tmp_path) == []
    path.write_text("".join(json.dumps({"event": "progress", "step": i}) + "\n" for i in range(3)))
    assert [e["step"] for e in read_progress(tmp_path)] == [0, 1, 2]
    with path.open("a") as out:
        out.write('{"event": "progress", "step": 3}\nnot json\n{"event": "progr')  # a line still being written
    assert [e["step"] for e in read_progress(tmp_path)] == [0, 1, 2, 3]
    with path.open("a") as out:
        out.write('ess", "step": 4}')  # whole JSON, its newline not written yet
    assert [e["step"] for e in read_progress(tmp_path)] == [0, 1, 2, 3, 4]
    with path.open("a") as out:
        out.write('\n{"event": "end", "status": "succeeded"}\n')
    events = read_progress(tmp_path)
    assert [e.get("step") for e in events] == [0, 1, 2, 3, 4, None] and events[-1]["event"] == "end"
    events.clear()  # a caller's list is its own
    assert len(read_progress(tmp_path)) == 6
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"event": "start", "total": 9}\n')
    os.replace(replacement, path)  # a new file (e.g. the run was restarted): read whole again
    assert read_progress(tmp_path) == [{"event": "start", "total": 9}]


def test_log_tail_reads_the_end_and_matches_reading_the_whole_file(tmp_path):
    path = tmp_path / "log.txt"
    assert log_tail(tmp_path) == ""
    lines = [f"step {i} ✓ loss {i / 7:.3f}" + ("\r progress 50%" if i % 5 == 0 else "") for i in range(40_000)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    whole = path.read_text(encoding="utf-8").splitlines()
    for count in (1, 30, 3_000):
        assert log_tail(tmp_path, count) == "\n".join(whole[-count:])
    path.write_text("only line")
    assert log_tail(tmp_path) == "only line"


def test_a_long_run_is_plotted_from_a_few_hundred_steps_every_eval_and_the_last_step():
    from ui.train_tab import PLOT_POINTS, _series

    events = [{"event": "start", "total": 20_000}]
    for step in range(1, 20_001):
        events.append({"event": "progress", "step": step, "loss": 1 / step})
        if step % 5_000 == 0:
            events.append({"event": "eval", "step": step, "loss": 2 / step})
    frame = _series(events, ("loss",))
    assert PLOT_POINTS <= len(frame) <= PLOT_POINTS + 10
    assert frame["step"].iloc[-1] == 20_000 and list(frame["step"]) == sorted(frame["step"])
    assert (frame["value"] == 2 / 5_000).any()  # eval points are all kept
    short = _series(events[:50], ("loss",))
    assert len(short) == 49  # a short run is plotted whole


def test_an_end_line_holding_a_unicode_line_separator_is_read_whole(tmp_path):
    """JSON keeps U+2028 / U+2029 / U+0085 raw inside strings (ensure_ascii=False), and a generated sample in the end
    line's metrics may hold one: splitlines() cut the line there, so a run that succeeded was recorded as failed."""
    end = {"event": "end", "status": "succeeded", "metrics": {"sample": "one\u2028two\u2029three\x85four"}}
    (tmp_path / "progress.jsonl").write_text(json.dumps(end, ensure_ascii=False) + "\n", encoding="utf-8")
    assert end_event(str(tmp_path)) == end

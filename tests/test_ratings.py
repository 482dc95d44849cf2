"""Arena ratings (storage/ratings.py): battles drawn from known Bradley–Terry strengths go in through the store's
own import and writes, and the fit must find the truth again; plus which comparisons are battles, ties as half a
win, the head-to-head gate and `python -m storage leaderboard`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from storage.db import Store, insert_comparisons
from storage.importers import import_file
from storage.ratings import battle_counts, head_to_head, leaderboard, load_battles, win_rate_matrix

REPO = Path(__file__).resolve().parent.parent
TRUTH = {"alpha": 1250.0, "bravo": 1120.0, "charlie": 1000.0, "delta": 940.0, "echo": 690.0}  # mean 1000, as fitted
ARENA_BATTLES = 3000


def simulate(rng: np.random.Generator, ratings: np.ndarray, n: int, tie_share: float = 0.3):
    """n battles between random pairs of distinct models: (index a, index b, outcome) with outcome 'a', 'b' or
    'tie'. A tie takes `tie_share` of the less likely result's chance, half from each side, so each side's
    expected score (wins + ties / 2) is still the Bradley–Terry probability."""
    a = rng.integers(0, len(ratings), n)
    b = (a + rng.integers(1, len(ratings), n)) % len(ratings)
    p = 1.0 / (1.0 + 10.0 ** ((ratings[b] - ratings[a]) / 400.0))
    tie = tie_share * np.minimum(p, 1.0 - p)
    u = rng.random(n)
    return a, b, np.where(u < p - tie / 2, "a", np.where(u < p + tie / 2, "tie", "b"))


def arena_record(n: int, model_a: str, model_b: str, outcome: str) -> dict:
    winner = {"a": "model_a", "b": "model_b"}.get(outcome) or ("tie" if n % 2 else "tie (bothbad)")
    question = {"role": "user", "content": f"Question number {n}?"}
    return {"question_id": f"q{n}", "model_a": model_a, "model_b": model_b, "winner": winner, "judge": "arena-user",
            "conversation_a": [question, {"role": "assistant", "content": f"{model_a} answers {n}."}],
            "conversation_b": [question, {"role": "assistant", "content": f"{model_b} answers {n}."}]}  # fmt: skip


@pytest.fixture(scope="module")
def arena(tmp_path_factory) -> dict:
    """A database file holding ARENA_BATTLES imported Chatbot Arena battles between the TRUTH models."""
    folder = tmp_path_factory.mktemp("arena")
    names = list(TRUTH)
    a, b, outcome = simulate(np.random.default_rng(7), np.array(list(TRUTH.values())), ARENA_BATTLES)
    records = [arena_record(n, names[x], names[y], o) for n, (x, y, o) in enumerate(zip(a, b, outcome, strict=True))]
    source = folder / "battles.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    db = folder / "arena.duckdb"
    store = Store(db)
    try:
        assert import_file(store, source)["comparisons"] == ARENA_BATTLES
    finally:
        store.close()
    played = {name: int((a == k).sum() + (b == k).sum()) for k, name in enumerate(names)}
    return {"db": db, "played": played, "ties": int((outcome == "tie").sum())}


@pytest.fixture
def arena_store(arena):
    store = Store(arena["db"])
    yield store
    store.close()


def test_the_fit_recovers_known_strengths(arena, arena_store):
    board = leaderboard(arena_store, bootstrap=200, seed=0)
    assert [row["model"] for row in board] == sorted(TRUTH, key=TRUTH.get, reverse=True)
    assert {row["model"]: row["battles"] for row in board} == arena["played"]
    fitted = {row["model"]: row for row in board}
    assert sum(row["rating"] for row in board) / len(board) == pytest.approx(1000.0, abs=0.05)  # mean-anchored
    for x, y in combinations(TRUTH, 2):  # the spread: every difference (≈ 14 points standard error)
        assert (fitted[x]["rating"] - fitted[y]["rating"]) == pytest.approx(TRUTH[x] - TRUTH[y], abs=45), (x, y)
    # 95% CIs: the truth (anchored on its mean like the fit) inside each interval, but for at most one model
    # that may sit just outside (five intervals at 95% all cover only ≈ 77% of the time)
    outside = [name for name, row in fitted.items() if not row["ci_low"] <= TRUTH[name] <= row["ci_high"]]
    assert len(outside) <= 1, outside
    for name in outside:
        width = fitted[name]["ci_high"] - fitted[name]["ci_low"]
        assert fitted[name]["ci_low"] - width / 2 <= TRUTH[name] <= fitted[name]["ci_high"] + width / 2
    for row in board:
        assert row["ci_low"] < row["rating"] < row["ci_high"]
        assert 20 < row["ci_high"] - row["ci_low"] < 150  # a few hundred battles each: tens of points, not 0
    assert leaderboard(arena_store, bootstrap=200, seed=0) == board  # seeded: the same CIs every time


def test_sql_counts_match_the_per_battle_load(arena, arena_store):
    battles = load_battles(arena_store)
    assert len(battles) == ARENA_BATTLES and battles.models == sorted(TRUTH)
    assert int((battles.score_a == 0.5).sum()) == arena["ties"]
    in_sql, in_numpy = battle_counts(arena_store), battle_counts(battles)
    assert in_sql.models == in_numpy.models
    assert per_pair(in_sql) == per_pair(in_numpy)
    assert in_sql.counts.sum() == ARENA_BATTLES


def per_pair(counts) -> dict:
    pairs = zip(counts.first.tolist(), counts.second.tolist(), strict=True)
    return {pair: row for pair, row in zip(pairs, counts.counts.tolist(), strict=True)}


def test_win_rate_matrix_is_consistent(arena, arena_store):
    matrix = win_rate_matrix(arena_store)
    assert matrix["models"] == sorted(TRUTH, key=TRUTH.get, reverse=True)
    rates, played = np.array(matrix["win_rate"], dtype=float), np.array(matrix["battles"])
    assert np.isnan(np.diag(rates)).all() and (np.diag(played) == 0).all()
    off = ~np.eye(len(TRUTH), dtype=bool)
    assert np.allclose((rates + rates.T)[off], 1.0) and (played == played.T).all()
    assert dict(zip(matrix["models"], played.sum(axis=1).tolist(), strict=True)) == arena["played"]
    best, worst = 0, len(TRUTH) - 1
    expected = 1 / (1 + 10 ** ((TRUTH["echo"] - TRUTH["alpha"]) / 400))
    assert rates[best, worst] == pytest.approx(expected, abs=0.08)


# ---- which comparisons are battles, and ties --------------------------------------------------------------------
def versioned_store(tmp_path) -> tuple[Store, int, dict]:
    store = Store(tmp_path / "versions.duckdb")
    store.add_version(base_model="bundled", parent_id=0, notes="v1")
    prompt = store.add_prompt("Which answer is better?", "test")
    gens = {
        "v0": store.add_generation(prompt, "base answer", model_version_id=0),
        "v0 again": store.add_generation(prompt, "another base answer", model_version_id=0),
        "v1": store.add_generation(prompt, "trained answer", model_version_id=1),
        "v1 named": store.add_generation(prompt, "trained, named", model_version_id=1, model_name="ignored"),
        "gpt-x": store.add_generation(prompt, "imported answer", model_name="gpt-x"),
        "nameless": store.add_generation(prompt, "nobody's answer"),
    }
    return store, prompt, gens


def test_only_effective_comparisons_between_two_models_are_battles(tmp_path):
    store, prompt, g = versioned_store(tmp_path)

    def judge(a: str, b: str, choice: str, **extra) -> int:
        return store.add_comparison(prompt_id=prompt, generation_a=g[a], generation_b=g[b], annotator="tester",
                                    choice=choice, **extra)  # fmt: skip

    try:
        judge("v0", "v1", "A")  # v0 beats v1
        judge("v1 named", "v0", "B")  # a version wins over a model name: v0 beats v1 again
        judge("v0", "v0 again", "A")  # one model against itself: no battle
        store.undo_comparison(judge("v1", "gpt-x", "B"), "tester")  # undone: no battle
        judge("v1", "gpt-x", "tie")
        wrong = judge("gpt-x", "v1", "A")
        judge("gpt-x", "v1", "both_bad", supersedes=wrong)  # a corrected judgement: only the correction counts
        judge("v0", "gpt-x", "skip")  # skipped: no battle
        judge("v0", "nameless", "A")  # no model to rate: left out
        assert len(load_battles(store)) == 4
        board = leaderboard(store, bootstrap=20)
        assert {row["model"]: row["battles"] for row in board} == {"v0": 2, "v1": 4, "gpt-x": 2}
        assert board[0]["model"] == "v0"
        assert head_to_head(store, "v0", "v1") | {"ci_low": 0, "ci_high": 0} == {
            "wins": 2, "losses": 0, "ties": 0, "battles": 2, "win_rate": 1.0, "ci_low": 0, "ci_high": 0}  # fmt: skip
        assert head_to_head(store, "gpt-x", "v1")["ties"] == 2  # the tie and the both_bad
        assert head_to_head(store, "v0", "gpt-x") == {"wins": 0, "losses": 0, "ties": 0, "battles": 0,
                                                      "win_rate": None, "ci_low": 0.0, "ci_high": 1.0}  # fmt: skip
    finally:
        store.close()


def test_ties_and_both_bad_count_half_a_win_each(tmp_path):
    store, prompt, g = versioned_store(tmp_path)
    try:
        v1_record = [("v1", "v0", "A"), ("v0", "v1", "B"), ("v1", "v0", "B"), ("v1", "v0", "tie"),
                     ("v0", "v1", "both_bad")]  # fmt: skip
        for a, b, choice in v1_record:  # v1: 2 wins, 1 loss, 2 ties
            store.add_comparison(prompt_id=prompt, generation_a=g[a], generation_b=g[b], annotator="t", choice=choice)
        record = head_to_head(store, "v1", "v0")
        assert (record["wins"], record["losses"], record["ties"], record["win_rate"]) == (2, 1, 2, 0.6)
        matrix = win_rate_matrix(store)
        assert matrix == {"models": ["v1", "v0"], "win_rate": [[None, 0.6], [0.4, None]], "battles": [[0, 5], [5, 0]]}
        ratings = {row["model"]: row["rating"] for row in leaderboard(store, bootstrap=0)}
        # 3 of 5 → odds 1.5 → 400·log10(1.5) = 70.4 points (the weak prior takes a fraction of a point off)
        assert ratings["v1"] - ratings["v0"] == pytest.approx(400 * math.log10(1.5), abs=1.0)
        assert ratings["v1"] + ratings["v0"] == pytest.approx(2000.0, abs=0.02)
    finally:
        store.close()


def test_an_imported_model_named_like_a_version_never_merges_with_it(db_url, tmp_path):
    """Imported models called "v1" (and "v1 (external)") are rated apart from local version 1, on both backends:
    the local v1 lost every battle to v0, the imported "v1" won every one against gpt-x."""
    store = Store(db_url)
    try:
        store.add_version(base_model="bundled", parent_id=0, notes="v1")
        prompt = store.add_prompt("Which answer is better?", "test")
        local = {v: store.add_generation(prompt, f"answer of v{v}", model_version_id=v) for v in (0, 1)}
        for _ in range(3):
            store.add_comparison(prompt_id=prompt, generation_a=local[0], generation_b=local[1], annotator="t",
                                 choice="A")  # fmt: skip
        records = [arena_record(n, name, "gpt-x", "a") for n in range(3) for name in ("v1", "v1 (external)")]
        source = tmp_path / "battles.jsonl"
        source.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        assert import_file(store, source)["comparisons"] == 6
        board = {row["model"]: row["battles"] for row in leaderboard(store, bootstrap=0)}
        assert board == {"v0": 3, "v1": 3, "v1 (external)": 3, "v1 (external) (external)": 3, "gpt-x": 6}
        assert head_to_head(store, "v1", "v0")["losses"] == 3  # local v1 kept its own record
        assert head_to_head(store, "v1 (external)", "gpt-x")["wins"] == 3
        assert head_to_head(store, "v1", "gpt-x")["battles"] == 0
    finally:
        store.close()


# ---- the promotion gate's figure --------------------------------------------------------------------------------
def test_head_to_head_ci_separates_a_better_model_from_a_coin_flip(tmp_path):
    store, prompt, g = versioned_store(tmp_path)
    better = store.add_generation(prompt, "candidate answer", model_version_id=2)
    rng, rows = np.random.default_rng(3), []
    for candidate, p_win in ((better, 0.7), (g["gpt-x"], 0.5)):
        for won in rng.random(300) < p_win:
            rows.append([None, prompt, candidate, g["v1"], "tester", "A" if won else "B", None, None, None, "test",
                         None, None])  # fmt: skip
    try:
        with store.transaction() as cur:
            insert_comparisons(cur, rows)
        strong, coin = head_to_head(store, "v2", "v1"), head_to_head(store, "gpt-x", "v1")
        assert strong["battles"] == coin["battles"] == 300
        assert strong["ci_low"] > 0.5 and strong["ci_low"] < strong["win_rate"] < strong["ci_high"]
        assert coin["ci_low"] < 0.5 < coin["ci_high"]
        mirrored = head_to_head(store, "v1", "v2")
        assert mirrored["wins"] == strong["losses"] and mirrored["ci_high"] == pytest.approx(1 - strong["ci_low"])
        with pytest.raises(ValueError):
            head_to_head(store, "v1", "v1")
    finally:
        store.close()


# ---- python -m storage leaderboard ------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PREFLOOP_DB"}
    return subprocess.run([sys.executable, "-m", "storage", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_prints_the_leaderboard_as_json(arena, tmp_path):
    result = run_cli("leaderboard", "--db", str(arena["db"]))
    assert result.returncode == 0, result.stderr
    board = json.loads(result.stdout)  # stdout is the JSON list and nothing else
    store = Store(arena["db"])
    try:
        assert board == leaderboard(store)  # the defaults: 200 resamples, seed 0
    finally:
        store.close()
    assert [row["model"] for row in board] == sorted(TRUTH, key=TRUTH.get, reverse=True)
    quick = run_cli("leaderboard", "--db", str(arena["db"]), "--bootstrap", "0")
    assert quick.returncode == 0, quick.stderr
    assert all(row["ci_low"] == row["rating"] == row["ci_high"] for row in json.loads(quick.stdout))


def test_cli_errors_are_one_line(arena, tmp_path):
    missing = tmp_path / "never.duckdb"
    for result, fragment in (
        (run_cli("leaderboard", "--db", str(missing)), "no such database file"),
        (run_cli("leaderboard", "--db", str(arena["db"]), "--bootstrap", "-1"), "bootstrap"),
    ):
        assert result.returncode == 1 and result.stdout == "", result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr
    assert not missing.exists()  # read-only: a wrong path creates nothing
    holder = Store(arena["db"])  # this test process plays the running app
    try:
        held = run_cli("leaderboard", "--db", str(arena["db"]))
        assert held.returncode == 1 and "is open in another process" in held.stderr
    finally:
        holder.close()

"""The arena: candidates are judged before they serve, the promotion gate, rollback, the promotions log, the share of
arena pairs, and the Leaderboard tab in a real Chromium after imported arena battles."""

from __future__ import annotations

import json
import time

import pytest

from generation.sampling import SamplingParams
from labeling.arena import GateRule, GateWatcher, judge
from labeling.pair_queue import PairQueue
from labeling.services import Services, UserError
from storage.db import Store
from storage.importers import import_file
from storage.promotions import promotions, version_status
from tests import rawhttp
from tests.apphelpers import running_app, wait_for
from tests.datahelpers import QUICK_RUN, seed_preferences
from tests.test_browser_label import browser  # noqa: F401 (the module-scoped browser fixture)
from tests.test_engine import make_adapter
from tests.test_security import users_file
from training.runner import JobRunner

QUICK = SamplingParams(max_new_tokens=6)


@pytest.fixture
def store(db_url, tmp_path, tiny_model_dir):
    store = Store(db_url)
    store.set_base_model(str(tiny_model_dir))  # as the app does with --model: the candidates' adapters fit it
    for i in range(6):
        store.add_prompt(f"Question number {i}?", "test")
    yield store
    store.close()


def services_for(store, engine, runner=None, **queue_options) -> Services:
    queue = PairQueue(store, engine, params=QUICK, **{"strategies": ("self", "versions"), **queue_options})
    return Services(store, engine, queue, runner, gate=GateRule(min_battles=20, confidence=0.95))


def add_candidate(store, tiny_model_dir, tmp_path, seed: int, parent: int = 0) -> int:
    adapter = make_adapter(tiny_model_dir, tmp_path / f"adapter-{seed}", seed=seed)
    return store.add_version(base_model=str(tiny_model_dir), adapter_path=str(adapter), parent_id=parent)


def add_battles(store, x: int, y: int, wins: int, losses: int, ties: int = 0) -> None:
    """Comparisons of version x's answers against version y's, x on side A or B in turn, through the store."""
    prompt = store.add_prompt(f"Battle {x} vs {y} ({time.monotonic_ns()})?", "test")
    outcomes = ["x"] * wins + ["y"] * losses + ["tie"] * ties
    for i, outcome in enumerate(outcomes):
        gen_x = store.add_generation(prompt, f"x{i}", model_version_id=x)
        gen_y = store.add_generation(prompt, f"y{i}", model_version_id=y)
        x_on_a = i % 2 == 0
        a, b = (gen_x, gen_y) if x_on_a else (gen_y, gen_x)
        choice = "tie" if outcome == "tie" else ("A" if (outcome == "x") == x_on_a else "B")
        store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="judge", choice=choice,
                             source="test")  # fmt: skip


def version_pairs(store) -> list[set]:
    with store.read() as cur:
        rows = cur.execute(
            "SELECT ga.model_version_id, gb.model_version_id FROM pairs p "
            "JOIN generations ga ON ga.id = p.generation_a JOIN generations gb ON gb.id = p.generation_b "
            "WHERE p.strategy = 'versions' ORDER BY p.id"
        ).fetchall()
    return [set(r) for r in rows]


def test_gate_promotes_a_clearly_better_candidate_and_refuses_a_coin_flip(store, engine, tiny_model_dir, tmp_path):
    services = services_for(store, engine)
    better = add_candidate(store, tiny_model_dir, tmp_path, seed=1)
    coin = add_candidate(store, tiny_model_dir, tmp_path, seed=2)
    add_battles(store, coin, 0, wins=15, losses=13, ties=2)  # a coin flip: 50 % ± 18 %
    add_battles(store, better, 0, wins=5, losses=0)  # too few battles, however one-sided

    for version, why in ((coin, "the CI still contains 50 %"), (better, "15 more battles needed")):
        with pytest.raises(UserError, match=why):
            services.promote(version, actor="root")
        assert engine.active_version == 0 and version_status(store, version) == "candidate"
    assert promotions(store) == []

    add_battles(store, better, 0, wins=20, losses=3, ties=2)  # 25-3-2 in all
    verdict = judge(store, better, 0, services.gate)
    assert verdict.passed and verdict.record["ci_low"] > 0.5
    assert "Passes the gate" in services.promote(better, actor="root")
    assert engine.active_version == better and store.get_setting("active_version") == str(better)
    assert (version_status(store, better), version_status(store, 0)) == ("serving", "retired")
    (row,) = promotions(store)
    assert (row["version_id"], row["from_version"], row["kind"], row["actor"]) == (better, 0, "gate", "root")
    evidence = row["evidence"]
    assert (evidence["wins"], evidence["losses"], evidence["ties"], evidence["battles"]) == (25, 3, 2, 30)
    assert evidence["against"] == "v0" and evidence["ci_low"] > 0.5 and evidence["decision"] == "promote"
    assert evidence["min_battles"] == 20 and evidence["confidence"] == 0.95
    # The coin flip is now judged against the new serving version: no battles there yet.
    with pytest.raises(UserError, match="no battles against v"):
        services.promote(coin)


def test_the_watcher_rejects_the_clearly_worse_and_auto_promotes_the_better(store, engine, tiny_model_dir, tmp_path):
    services = services_for(store, engine)
    worse = add_candidate(store, tiny_model_dir, tmp_path, seed=1)
    add_battles(store, worse, 0, wins=3, losses=24, ties=3)
    watcher = GateWatcher(services, auto_promote=True)
    (verdict,) = watcher.check()
    assert verdict.decision == "reject" and version_status(store, worse) == "rejected"
    assert engine.active_version == 0 and promotions(store) == []
    assert watcher.check() == []  # nothing changed: nothing recomputed

    better = add_candidate(store, tiny_model_dir, tmp_path, seed=2)
    add_battles(store, better, 0, wins=26, losses=2, ties=2)
    watcher.check()
    assert engine.active_version == better
    (row,) = promotions(store)
    assert (row["kind"], row["actor"], row["evidence"]["wins"]) == ("auto", "auto-promote", 26)

    manual = GateWatcher(services, auto_promote=False)  # without --auto-promote a passing candidate waits
    third = add_candidate(store, tiny_model_dir, tmp_path, seed=3, parent=better)
    add_battles(store, third, better, wins=27, losses=1, ties=2)
    (verdict,) = manual.check()
    assert verdict.passed and engine.active_version == better and version_status(store, third) == "candidate"


def test_rollback_serves_the_old_adapter_without_restart(store, engine, tiny_model_dir, tmp_path):
    services = services_for(store, engine)
    first = add_candidate(store, tiny_model_dir, tmp_path, seed=1)
    second = add_candidate(store, tiny_model_dir, tmp_path, seed=2, parent=first)
    add_battles(store, second, first, wins=4, losses=6)
    assert "(override)" in services.activate(first, actor="root")  # a candidate served by hand: an override
    assert "(override)" in services.activate(second, actor="root")
    assert "(rollback)" in services.activate(first, actor="root")  # it served before: a rollback
    assert "already serving" in services.activate(first, actor="root")  # no row for serving what serves
    assert engine.active_version == first and store.get_setting("active_version") == str(first)
    rows = promotions(store)
    assert [(r["version_id"], r["from_version"], r["kind"]) for r in rows] == [
        (first, second, "rollback"), (second, first, "override"), (first, 0, "override")
    ]  # fmt: skip
    assert rows[0]["evidence"]["against"] == f"v{second}" and rows[0]["evidence"]["wins"] == 6  # first won 6 of 10
    assert (version_status(store, first), version_status(store, second)) == ("serving", "retired")

    # New pairs come from the rolled-back adapter: the same seed through version `first` gives the same text.
    assert services.queue.generate_pairs(1, "self") == 1
    with store.read() as cur:
        gens = cur.execute(
            "SELECT g.model_version_id, g.text, g.params, pr.messages FROM pairs p JOIN generations g "
            "ON g.id IN (p.generation_a, p.generation_b) JOIN prompts pr ON pr.id = p.prompt_id "
            "WHERE p.strategy = 'self'"
        ).fetchall()
    assert {g[0] for g in gens} == {first}
    for _, text, params, messages in gens:
        stored = json.loads(params)
        same = SamplingParams(
            **{k: stored[k] for k in ("temperature", "top_p", "max_new_tokens", "seed", "repetition_penalty")}
        )
        assert engine.submit(json.loads(messages), same, first).result(timeout=60).text == text


def test_arena_pairs_are_a_share_of_new_pairs_while_a_candidate_waits(store, engine, tiny_model_dir, tmp_path):
    services = services_for(store, engine, target=8, arena_share=0.25)
    queue = services.queue
    queue.reserved_rows = 0  # 4 pairs generate at once on the 8-row test engine

    def fill() -> None:
        for _ in range(200):
            queue._top_up()
            wait_for(lambda: all(f.done() for item in queue._in_flight for f in item.futures), 60, "generations")
            queue._collect()
            if queue.depth() >= queue.target:
                return
        raise AssertionError("the queue did not fill")

    fill()
    assert version_pairs(store) == []  # no candidate: ordinary pairs only, and no arena pairs owed
    with store.transaction() as cur:
        cur.execute("UPDATE pairs SET status = 'done'")
    candidate = add_candidate(store, tiny_model_dir, tmp_path, seed=1)
    fill()
    pairs = version_pairs(store)
    assert len(pairs) == 2 and all(p == {candidate, 0} for p in pairs)  # 25 % of the 8 new pairs
    assert engine.active_version == 0 and engine.has_version(candidate)  # loaded to generate, not served


@pytest.mark.slow
def test_a_finished_run_is_a_candidate_judged_before_it_serves(store, engine, tiny_model_dir, tmp_path):
    runner = JobRunner(store, runs_dir=tmp_path / "runs", base_model=str(tiny_model_dir), model_cache=tmp_path / "c")
    services = services_for(store, engine, runner)
    first = add_candidate(store, tiny_model_dir, tmp_path, seed=1)
    services.activate(first, actor="root")
    seed_preferences(store, 8)
    status = runner.wait(runner.submit("dpo", QUICK_RUN, parent_version=first), timeout=600)
    assert status.status == "succeeded", status.error
    candidate = status.result_version
    assert version_status(store, candidate) == "candidate"
    assert engine.active_version == first and store.get_setting("active_version") == str(first)
    assert services.queue.generate_pairs(6, "versions") == 6
    pairs = version_pairs(store)
    assert all(candidate in p and p <= {candidate, first, 0} for p in pairs)  # vs the serving one or the base
    assert engine.active_version == first and engine.has_version(candidate)


def arena_jsonl(path, battles: list[tuple[str, str, str]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i, (model_a, model_b, winner) in enumerate(battles):
            question = [{"role": "user", "content": f"Question {i}?"}]
            out.write(json.dumps({
                "question_id": f"q{i}", "model_a": model_a, "model_b": model_b, "winner": winner, "judge": f"j{i % 3}",
                "conversation_a": [*question, {"role": "assistant", "content": f"{model_a} answers {i}"}],
                "conversation_b": [*question, {"role": "assistant", "content": f"{model_b} answers {i}"}],
            }) + "\n")  # fmt: skip


@pytest.mark.browser
@pytest.mark.slow
def test_leaderboard_tab_shows_ratings_plot_and_heatmap_after_imported_battles(browser, tmp_path, tiny_model_dir):  # noqa: F811
    outcomes = ["model_a"] * 6 + ["model_b"] * 2 + ["tie", "tie (bothbad)"]
    battles = [("alpha", "beta", w) for w in outcomes] + [("beta", "gamma", w) for w in outcomes]
    battles += [("gamma", "alpha", "model_b")] * 5
    arena_jsonl(tmp_path / "arena.jsonl", battles)
    with running_app(tmp_path, tiny_model_dir, queue_size=2, wait_pairs=1) as (url, services):
        summary = import_file(services.store, tmp_path / "arena.jsonl", fmt="arena")
        assert summary["comparisons"] == len(battles)
        page = browser.new_page(viewport={"width": 1300, "height": 1400})
        page.goto(url)
        page.get_by_role("tab", name="Leaderboard").click()
        page.locator("#leaderboard-summary").get_by_text("battles between").wait_for(timeout=30_000)
        assert "25 battles between 3 models" in page.locator("#leaderboard-summary").inner_text()
        plot = page.locator("#leaderboard-plot")
        plot.locator("canvas, svg.marks").first.wait_for(timeout=30_000)  # the CI bars are drawn
        box = plot.locator("canvas, svg.marks").first.bounding_box()
        assert box and box["width"] > 200 and box["height"] > 100
        table = page.locator("#leaderboard-table").inner_text()
        assert table.index("alpha") < table.index("beta") < table.index("gamma")  # best first
        heatmap = page.locator("#winrate-heatmap")
        assert heatmap.inner_text().split().count("70%") == 2  # alpha vs beta, beta vs gamma: 6-2 and 2 half-wins
        assert "100%" in heatmap.inner_text() and "background-color" in heatmap.inner_html()
        assert "alpha" in page.locator("#battles-table").inner_text()
        assert "No candidate is waiting" in page.locator("#gate-evidence").inner_text()
        page.locator("#promote-btn").click()  # the local admin sees the button; nothing to promote yet
        page.locator("#promote-message").get_by_text("No candidate is waiting").wait_for(timeout=30_000)
        assert services.engine.active_version == 0 and promotions(services.store) == []
        page.close()


@pytest.mark.slow
def test_promote_button_is_for_admins_and_the_leaderboard_for_every_reader(tmp_path, tiny_model_dir):
    with running_app(tmp_path, tiny_model_dir, "--auth", str(users_file(tmp_path)), queue_size=2) as (url, services):
        candidate = add_candidate(services.store, tiny_model_dir, tmp_path, seed=1)
        add_battles(services.store, candidate, 0, wins=26, losses=2, ties=2)
        admin, bob, vera = (rawhttp.client(url, name, f"{name}-pw") for name in ("alice", "bob", "vera"))
        cfg = rawhttp.config(admin)
        promote, refresh = rawhttp.fn_index(cfg, "promote-btn"), rawhttp.fn_index(cfg, "leaderboard-refresh")
        assert rawhttp.call(rawhttp.client(url), promote, [])[0] == 401
        for who in (bob, vera):  # an annotator and a viewer read the leaderboard but cannot promote
            _, output = rawhttp.call(who, refresh, [])
            assert "battles between" in rawhttp.text_of(output) and "Passes the gate" in rawhttp.text_of(output)
            _, output = rawhttp.call(who, promote, [])
            assert "for admins" in rawhttp.text_of(output), output
        assert services.engine.active_version == 0 and promotions(services.store) == []
        _, output = rawhttp.call(admin, promote, [])
        assert "is now serving (promoted by the gate)" in rawhttp.text_of(output), output
        assert services.engine.active_version == candidate
        (row,) = promotions(services.store)
        assert (row["kind"], row["actor"], row["evidence"]["wins"]) == ("gate", "alice", 26)
        _, output = rawhttp.call(admin, rawhttp.fn_index(cfg, "version-activate"), [0, None])  # back to the base
        assert "is now serving (rollback)" in rawhttp.text_of(output) and services.engine.active_version == 0
        back = promotions(services.store)[0]
        fields = ("version_id", "from_version", "kind", "actor")
        assert [back[k] for k in fields] == [0, candidate, "rollback", "alice"]
        assert back["evidence"]["losses"] == 26  # the base's record against the version it replaces


def test_a_reject_changes_only_a_version_still_waiting(store):
    """The arena's verdict is computed, then written: an admin who served the version in between kept 'serving'
    only if the reject asks for a candidate."""
    from storage.promotions import set_status, version_status

    version = store.add_version(base_model="bundled", adapter_path="/nowhere", parent_id=0)
    set_status(store, version, "serving")
    set_status(store, version, "rejected", only_if="candidate")
    assert version_status(store, version) == "serving"
    set_status(store, version, "candidate")
    set_status(store, version, "rejected", only_if="candidate")
    assert version_status(store, version) == "rejected"


def test_adapters_no_pair_needs_are_unloaded_and_a_busy_one_waits(store, engine, tiny_model_dir, tmp_path):
    """A rejected candidate's adapter leaves the engine (rounds of training would pile them up), but not while a
    request of it still runs; the serving version and waiting candidates stay loaded."""
    from generation.sampling import SamplingParams, VersionNotLoaded

    services = services_for(store, engine)
    worse, waiting = (add_candidate(store, tiny_model_dir, tmp_path, seed=s) for s in (1, 2))
    for version in (worse, waiting):
        engine.load_version(version, store.get_version(version)["adapter_path"])
    add_battles(store, worse, 0, wins=3, losses=24, ties=3)
    running = engine.submit([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=400, seed=1), worse)
    watcher = GateWatcher(services)
    watcher.check()
    still_running = not running.done()  # 400 tokens take the tiny model ~1 s; the check takes milliseconds
    assert version_status(store, worse) == "rejected" and engine.has_version(worse) == still_running
    running.result(timeout=120)
    assert services.free_adapters() == ([worse] if still_running else [])  # else the check freed it already
    assert not engine.has_version(worse) and engine.has_version(waiting) and engine.has_version(0)
    with pytest.raises(VersionNotLoaded):
        engine.submit([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=4), worse)
    assert (
        engine.submit([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=4), waiting).result(60).text
    )


def pair_statuses(store, strategy: str) -> list[str]:
    with store.read() as cur:
        sql = "SELECT status FROM pairs WHERE strategy = ? ORDER BY id"
        return [r[0] for r in cur.execute(sql, [strategy]).fetchall()]


def test_arena_pairs_against_the_base_stay_and_a_rejected_candidates_go(store, engine, tiny_model_dir, tmp_path):
    """With v1 serving, the arena pairs a candidate against v1 and the base: both kinds are stored ready (those
    against the base used to be stored retired: half the arena's generation thrown away); once the gate rejects the
    candidate, its pairs still waiting are retired and nobody is given one."""
    services = services_for(store, engine)
    serving = add_candidate(store, tiny_model_dir, tmp_path, seed=1)
    services.activate(serving, actor="root")
    candidate = add_candidate(store, tiny_model_dir, tmp_path, seed=2, parent=serving)
    assert services.queue.generate_pairs(8, "versions") == 8
    assert {frozenset(p) for p in version_pairs(store)} == {frozenset({candidate, serving}), frozenset({candidate, 0})}
    assert pair_statuses(store, "versions") == ["ready"] * 8

    add_battles(store, candidate, serving, wins=2, losses=26, ties=2)
    (verdict,) = GateWatcher(services).check()
    assert verdict.decision == "reject"
    assert pair_statuses(store, "versions") == ["retired"] * 8
    given = [services.next_pair(f"judge{i}") for i in range(3)]
    assert all(pair is None or pair["strategy"] != "versions" for pair in given)


def test_the_gate_checks_again_when_only_the_serving_version_changed(store, engine, tiny_model_dir, tmp_path):
    """A candidate waits against v1 (no battles) but clearly beats the base: a rollback to the base alone (no new
    comparison) must bring a new check, which promotes it."""
    services = services_for(store, engine)
    first = add_candidate(store, tiny_model_dir, tmp_path, seed=1)
    services.activate(first, actor="root")
    candidate = add_candidate(store, tiny_model_dir, tmp_path, seed=2, parent=first)
    add_battles(store, candidate, 0, wins=27, losses=1, ties=2)
    watcher = GateWatcher(services, auto_promote=True)
    (verdict,) = watcher.check()
    assert verdict.decision == "wait" and engine.active_version == first
    services.activate(0, actor="root")
    assert watcher.check() and engine.active_version == candidate


def test_promote_without_a_version_serves_the_one_that_passes_not_the_newest(store, engine, tiny_model_dir, tmp_path):
    services = services_for(store, engine)
    passing = add_candidate(store, tiny_model_dir, tmp_path, seed=1)
    add_battles(store, passing, 0, wins=27, losses=1, ties=2)
    newest = add_candidate(store, tiny_model_dir, tmp_path, seed=2)  # no battles yet: the arena judges it now
    assert "Version" in services.promote(actor="root") and engine.active_version == passing
    assert version_status(store, newest) == "candidate"
    with pytest.raises(UserError, match=f"v{newest} has no battles"):
        services.promote(actor="root")  # nothing passes now: the arena's current candidate says why


def test_a_candidate_stays_when_the_app_names_its_base_folder_another_way(
    store, tiny_model_dir, tmp_path, monkeypatch
):
    """Trained under --model /abs/tiny, then the app restarted with --model ./tiny (the same folder): the candidate
    silently left the arena and the Promote button (its base_model text differed)."""
    from storage.promotions import candidates

    version = add_candidate(store, tiny_model_dir, tmp_path, seed=1)
    monkeypatch.chdir(tiny_model_dir.parent)
    store.set_base_model(f"./{tiny_model_dir.name}")
    assert [c["id"] for c in candidates(store)] == [version]
    store.set_base_model(str(tmp_path))  # another folder: another base
    assert candidates(store) == []

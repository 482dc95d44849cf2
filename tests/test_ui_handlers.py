"""Tab handlers as several people's pages call them (a request here is any object with .username): what each
person is shown, and that one page's refresh does not decide what another page shows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from labeling.access import Access, User
from labeling.pair_queue import PairQueue
from labeling.services import Services
from storage.db import Store
from tests.datahelpers import MARKDOWN_BAIT, markdown_battle_file
from training.runner import JobRunner
from ui.data_tab import DataHandlers
from ui.leaderboard_tab import LeaderboardHandlers
from ui.train_tab import TrainHandlers

USERS = {name: User(name, "pw", role) for name, role in
         (("root", "admin"), ("ann1", "annotator"), ("ann2", "annotator"), ("watcher", "viewer"))}  # fmt: skip


def as_user(name: str | None):
    return SimpleNamespace(username=name)


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "tabs.duckdb")
    yield store
    store.close()


@pytest.fixture
def services(store, engine, tmp_path, tiny_model_dir):
    """The app's services on the tiny model, without the refill thread (no pairs are needed here)."""
    runner = JobRunner(store, runs_dir=tmp_path / "runs", base_model=str(tiny_model_dir))
    return Services(store, engine, PairQueue(store, engine), runner)


def judge(store, annotator: str, prompt_text: str, source: str = "import", rationale: str | None = None) -> None:
    prompt = store.add_prompt([{"role": "user", "content": prompt_text}], source)
    a, b = (store.add_generation(prompt, text, model_version_id=0) for text in ("first answer", "second answer"))
    store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator=annotator, choice="A",
                         rationale=rationale, source="test")  # fmt: skip


def test_the_data_tab_shows_others_judgements_only_to_admins(store, services):
    """An annotator's typed prompt, name, choices and rationale are theirs: another annotator, a viewer or a caller
    without a login sees the totals and their own judgements only; an admin sees everyone's."""
    judge(store, "ann2", "My bank PIN is 4921, is it safe?", source="own", rationale="private reason")
    judge(store, "ann1", "What is tea?")
    data = DataHandlers(services, Access(users=USERS, local=False), 1000)

    _, per_annotator, _, totals, recent = data.stats(as_user("ann1"))
    assert "**2** comparisons" in totals  # the totals are for every reader
    assert list(per_annotator["annotator"]) == ["ann1"] and list(recent["annotator"]) == ["ann1"]
    assert "4921" not in recent.to_string() and "private reason" not in recent.to_string()
    for reader in ("watcher", None):
        _, per_annotator, _, totals, recent = data.stats(as_user(reader))
        assert (per_annotator.empty and recent.empty) if reader else totals == ""  # no login: refused outright
    _, per_annotator, _, _, recent = data.stats(as_user("root"))
    assert sorted(per_annotator["annotator"]) == ["ann1", "ann2"] and "4921" in recent.to_string()


def test_the_train_tabs_timer_keeps_the_reward_model_the_admin_picked(store, services, tmp_path):
    """The overview refreshes every 5 s; it used to set the PPO reward model back to the newest each time."""
    older, newer = (str(tmp_path / f"reward-{i}") for i in (1, 2))
    for path in (older, newer):
        store.add_version(kind="reward", base_model=services.runner.base_model, adapter_path=path)
    train = TrainHandlers(services, Access())
    assert train.overview(None, None, None, as_user(None))[2]["value"] == newer  # nothing picked yet: the newest
    assert train.overview(None, None, older, as_user(None))[2]["value"] == older  # picked: kept
    assert train.overview(None, None, "/gone", as_user(None))[2]["value"] == newer  # a pick no longer offered


def test_the_ppo_dropdown_offers_only_reward_models_of_this_base(store, services, tmp_path):
    """A reward model trained on another base model cannot score this model's answers (PPO refuses it at submit):
    the Train tab no longer offers it, and never picks it as the newest."""
    base = services.runner.base_model  # the app's base model (--model), as PPO's submit checks it
    mine = store.add_version(kind="reward", base_model=base, adapter_path=str(tmp_path / "reward-mine"))
    store.add_version(kind="reward", base_model="some/other-model", adapter_path=str(tmp_path / "reward-other"))
    reward = TrainHandlers(services, Access()).overview(None, None, None, as_user(None))[2]
    assert [path for _, path in reward["choices"]] == [str(tmp_path / "reward-mine")] and mine
    assert reward["value"] == str(tmp_path / "reward-mine")


def test_every_leaderboard_page_gets_a_change_not_only_the_first_to_ask(store, services, tmp_path):
    """The timer's refresh sends nothing while the store holds what that page shows; a change reaches each page
    (the first page's tick used to mark the change seen for every page)."""
    board = LeaderboardHandlers(services, Access())
    first, second = board.refresh(as_user(None)), board.refresh(as_user(None))
    assert first[0].startswith("No battles yet")
    assert board.refresh_if_changed(first[-1], as_user(None)) == [{"__type__": "update"}] * 9  # nothing new: skip
    battle = store.add_version(base_model="tiny", adapter_path=str(tmp_path / "v1"))
    prompt = store.add_prompt([{"role": "user", "content": "Which is better?"}], "import")
    a, b = (store.add_generation(prompt, text, model_version_id=v) for text, v in (("x", 0), ("y", battle)))
    store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator="ann1", choice="A", source="test")
    for page in (first, second):  # the first page's tick must not use up the change for the second
        shown = board.refresh_if_changed(page[-1], as_user(None))
        assert shown[0].startswith("**1** battles between **2** models") and shown[-1] != page[-1]
        assert board.refresh_if_changed(shown[-1], as_user(None)) == [{"__type__": "update"}] * 9


def test_undo_waits_while_an_own_prompt_streams_and_a_bad_stored_name_is_explained(store, services):
    """Undo during an own prompt's stream would show another pair under the streaming answers (and a vote then
    went to that pair); a name stored in the browser that the store refuses used to raise on page load."""
    from ui.label_tab import STREAMING, LabelHandlers

    store.add_prompt([{"role": "user", "content": "Name a colour."}], "import")
    services.queue.generate_pairs(1)
    label = LabelHandlers(services, Access())
    pair = services.next_pair("ann1")
    services.vote(pair["pair_id"], "ann1", "A")
    refused = label.undo("ann1", STREAMING, as_user(None))
    assert refused[-1].startswith("⚠️ Your own prompt is being answered")
    with store.read() as cur:
        assert cur.execute("SELECT count(*) FROM effective_comparisons").fetchone()[0] == 1  # the vote stands
    login = label.login("bad\x7fname", as_user(None))
    assert login[0] == "" and login[1]["visible"] is True and login[-1].startswith("⚠️ Names are at most")


def test_an_export_with_nothing_to_write_leaves_no_folder_behind(store, services):
    import tempfile
    from pathlib import Path

    from ui.data_tab import EXPORT_PREFIX

    before = set(Path(tempfile.gettempdir()).glob(f"{EXPORT_PREFIX}*"))
    file, message = DataHandlers(services, Access(), 1000).do_export("dpo", ".jsonl", as_user(None))
    assert file is None and message.startswith("Nothing to export")
    assert set(Path(tempfile.gettempdir()).glob(f"{EXPORT_PREFIX}*")) <= before  # (it prunes hour-old ones too)


def test_the_run_view_sends_nothing_while_the_run_is_unchanged(store, services):
    """The Train tab's 1-s timer re-sent a finished run's plots, table and log every second."""
    from tests.datahelpers import seed_preferences

    seed_preferences(store, 4)
    run_id = services.runner.submit("dpo", {"max_steps": 1})
    services.runner.cancel(run_id)
    assert services.runner.wait(run_id, timeout=120).status == "cancelled"
    train = TrainHandlers(services, Access())
    first = train.watch(run_id, None, as_user(None))
    assert "cancelled" in first[0] and first[-1] is not None
    assert train.watch(run_id, first[-1], as_user(None)) == [{"__type__": "update"}] * 9
    assert train.watch(run_id, None, as_user(None))[:-1] == first[:-1]  # a page that shows nothing yet gets it all


def shown_html(markdown: str) -> str:
    """What a Markdown component makes of a message (CommonMark, as the page's renderer reads it)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").render(markdown)


def test_markdown_in_an_import_error_or_a_name_is_shown_as_text(store, services, tmp_path):
    """An importer's error quotes the file; a display name is typed by anyone: neither may make a link, an image,
    a tag or emphasis in the page's Markdown."""
    from ui.label_tab import LabelHandlers

    evil, path = MARKDOWN_BAIT, markdown_battle_file(tmp_path)
    message = DataHandlers(services, Access(), 1000).do_import(str(path), "auto", as_user(None))[0]
    assert message.startswith("⚠️ Import failed")
    name = "![pixel](https://example.com/p.png) *me*"
    status = LabelHandlers(services, Access()).set_name(name, as_user(None))[-1]
    for text, literal in ((message, evil), (status, name)):
        html = shown_html(text)
        assert "<a " not in html and "<img" not in html and "<b>" not in html and "<em>" not in html, html
        assert literal.replace("<", "&lt;").replace(">", "&gt;") in html  # every character shown as written


def test_a_model_named_model_is_rated_like_any_other(store, services):
    """The win-rate table's first column holds the row's model: a model called "model" used to clash with it."""
    prompt = store.add_prompt([{"role": "user", "content": "Which is better?"}], "import")
    ours = store.add_generation(prompt, "ours", model_version_id=0)
    for name in ("model", "model ", "other"):
        theirs = store.add_generation(prompt, name, model_name=name)
        store.add_comparison(prompt_id=prompt, generation_a=ours, generation_b=theirs, annotator="ann1", choice="A",
                             source="test")  # fmt: skip
    shown = LeaderboardHandlers(services, Access()).refresh(as_user(None))
    assert shown[0].startswith("**3** battles between **4** models")
    import gradio as gr

    assert gr.Dataframe(interactive=False).postprocess(shown[3]).headers[1:] == list(shown[3].data.columns[1:])
    heatmap = shown[3].data
    assert len(set(heatmap.columns)) == 5 and heatmap.iloc[:, 0].tolist() == list(heatmap.columns[1:])
    assert heatmap.set_index(heatmap.columns[0]).loc["model", "v0"] == 0.0  # v0 won: "model" scored 0 %

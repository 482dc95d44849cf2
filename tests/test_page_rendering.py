"""What the page does with awkward text and keys, in a real Chromium: long unbroken text stays inside its box, a
held key or a key pressed on another tab casts no vote, and Markdown in a name or an import error shows as text."""

from __future__ import annotations

import time

import pytest

from tests.apphelpers import running_app, wait_for
from tests.datahelpers import MARKDOWN_BAIT, markdown_battle_file
from tests.test_browser_label import CHROMIUM, CHROMIUM_ARGS, open_page, rows, wait_pair_shown, wait_votes

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WORD = "x" * 2000
URL = "https://example.com/" + "a" * 2000
LONG = f"{WORD}\n\n[{URL}]({URL}) {URL}\n\n```\n{'y' * 2000}\n```\n\n| h |\n|---|\n| {'z' * 2000} |\n"
SIZES = """(id) => { const e = document.getElementById(id); const r = e.getBoundingClientRect();
  return {scroll: e.scrollWidth, client: e.clientWidth, right: r.right, page: document.documentElement.scrollWidth,
          view: window.innerWidth}; }"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def test_long_unbroken_text_stays_inside_the_prompt_and_answer_boxes(browser, tmp_path, tiny_model_dir):
    with running_app(tmp_path, tiny_model_dir, queue_size=2, wait_pairs=2) as (url, services):
        with services.store.transaction() as cur:  # every waiting pair now holds a 2,000-character word and URL
            cur.execute("UPDATE generations SET text = ?", [LONG])
            chat = f'[{{"role": "user", "content": "{URL}"}}]'
            cur.execute("UPDATE prompts SET text = ?, messages = ?", [LONG, chat])
        page = open_page(browser, url, "wendy")
        wait_pair_shown(page)
        wait_for(lambda: "example.com" in page.locator("#answer-b").inner_text(), 30, "the long answer")
        for box in ("prompt", "answer-a", "answer-b"):
            size = page.evaluate(SIZES, box)
            assert size["page"] <= size["view"], (box, size)  # the page does not scroll sideways
            assert size["right"] <= size["view"], (box, size)  # the box ends inside the window
            assert size["scroll"] <= size["client"] + 1, (box, size)  # wrapped (a code block scrolls inside)
            if box != "prompt":  # each answer keeps its half of the row
                assert size["right"] - page.locator(f"#{box}").bounding_box()["x"] < size["view"] / 2 + 20, size
        page.close()


def test_a_held_key_or_a_key_on_another_tab_casts_no_vote(browser, tmp_path, tiny_model_dir):
    name = "![pixel](https://example.com/p.png) *me*"  # a name the store takes, written in Markdown
    with running_app(tmp_path, tiny_model_dir, queue_size=4, wait_pairs=4) as (url, services):
        page = open_page(browser, url, name)  # waits for "Labeling as " + the name as written: shown literally
        assert page.locator("img[src*='example.com']").count() == 0 and page.locator("em", has_text="me").count() == 0
        wait_pair_shown(page)
        page.locator("h1").click()
        page.keyboard.down("1")
        wait_votes(page, 1)  # the next pair is on the page
        for _ in range(3):
            page.keyboard.down("1")  # held: auto-repeat keydowns
            time.sleep(0.3)
        page.keyboard.up("1")
        time.sleep(2)
        assert rows(services, name) == [("A",)]

        page.get_by_role("tab", name="Data").click()
        page.locator("h1").click()
        page.keyboard.press("2")  # the Label tab is hidden: its pair is not on screen
        time.sleep(3)
        assert rows(services, name) == [("A",)]
        page.get_by_role("tab", name="Label").click()
        page.locator("h1").click()
        page.keyboard.press("2")  # back on the Label tab the keys work
        wait_votes(page, 2)
        assert rows(services, name) == [("A",), ("B",)]
        page.close()


def test_an_import_error_quoting_markdown_from_the_file_is_shown_as_text(browser, tmp_path, tiny_model_dir):
    """The importer's message quotes the file's bad field: a link, an image and a tag in it stay text."""
    evil, broken = MARKDOWN_BAIT, markdown_battle_file(tmp_path)
    with running_app(tmp_path, tiny_model_dir, queue_size=1, wait_pairs=1) as (url, _):
        page = open_page(browser, url, "dana")
        page.get_by_role("tab", name="Data").click()
        page.locator("#import-file input[type=file]").set_input_files(str(broken))
        page.get_by_role("button", name="Import", exact=True).click()
        message = page.get_by_text("Import failed, nothing was written")
        message.wait_for(timeout=30_000)
        assert evil in message.inner_text()  # every character shown as written
        shown = page.locator("a[href*='example.com'], img[src*='example.com'], b:text('bold'), strong:text('loud')")
        assert shown.count() == 0
        page.close()

"""A person labels in a real Chromium: mouse, keyboard, own prompt, edit, skip, bad input, no script injection."""

from __future__ import annotations

import pytest

from tests.apphelpers import running_app, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    from pathlib import Path

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make test` installs it with apt (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def effective(services, annotator: str) -> list[tuple]:
    with services.store.read() as cur:
        return cur.execute(
            "SELECT choice, edited_answer, rationale FROM effective_comparisons WHERE annotator = ? ORDER BY id",
            [annotator],
        ).fetchall()


def rows(services, annotator: str) -> list[tuple]:
    with services.store.read() as cur:
        return cur.execute("SELECT choice FROM comparisons WHERE annotator = ? ORDER BY id", [annotator]).fetchall()


def open_page(browser, url: str, name: str):
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    page.goto(url)
    page.get_by_label("Your display name (stored in this browser)").fill(name)
    page.get_by_role("button", name="Start labeling", exact=True).click()
    page.get_by_text(f"Labeling as {name}").wait_for(timeout=30_000)
    return page


def wait_pair_shown(page):
    wait_for(lambda: page.locator("#answer-a").inner_text().strip() != "", 60, "answer A on the page")


def wait_votes(page, n: int):
    """The counters line is updated in the same response that shows the next pair."""
    page.get_by_text(f"Your votes today: {n} ·").wait_for(timeout=30_000)


def test_label_with_mouse_keyboard_own_prompt_edit_and_skip(browser, tmp_path, tiny_model_dir):
    with running_app(tmp_path, tiny_model_dir, queue_size=6, wait_pairs=6) as (url, services):
        page = open_page(browser, url, "alice")
        expected = []
        for label, choice in [("A is better", "A"), ("B is better", "B"), ("Tie", "tie"), ("Both bad", "both_bad"),
                              ("A is better", "A")]:  # fmt: skip
            wait_pair_shown(page)
            page.get_by_role("button", name=label, exact=True).click()
            expected.append(choice)
            wait_votes(page, len(expected))
        for key, choice in [("1", "A"), ("2", "B"), ("3", "tie"), ("4", "both_bad"), ("b", "B")]:
            wait_pair_shown(page)
            page.locator("h1").click()  # focus on the page, not in a text box
            page.keyboard.press(key)
            expected.append(choice)
            wait_votes(page, len(expected))
        assert [r[0] for r in effective(services, "alice")] == expected

        # Skip: recorded as a skip row, not an effective comparison.
        wait_pair_shown(page)
        page.get_by_role("button", name="Skip", exact=True).click()
        page.get_by_text("Saved: skipped").wait_for(timeout=30_000)
        assert rows(services, "alice")[-1][0] == "skip"

        # Edit the better answer, with a rationale.
        wait_pair_shown(page)
        page.get_by_text("Edit the better answer").click()
        page.get_by_role("button", name="Start from A", exact=True).click()
        wait_for(lambda: page.locator("#edited textarea").input_value() != "", 10, "the edit box to fill")
        page.locator("#edited textarea").fill("A corrected, better answer.")
        page.locator("#rationale input, #rationale textarea").first.fill("A was closer")
        page.get_by_role("button", name="A is better", exact=True).click()
        expected.append("A")
        wait_votes(page, len(expected))
        assert effective(services, "alice")[-1] == ("A", "A corrected, better answer.", "A was closer")

        # Own prompt: both sides stream, the pair is stored, then judged.
        page.get_by_text("Write your own prompt").click()
        page.locator("#own-prompt textarea").fill("Tell me about rivers.")
        page.get_by_role("button", name="Answer it", exact=True).click()
        page.get_by_text("Your pair is ready").wait_for(timeout=60_000)
        assert page.locator("#answer-a").inner_text().strip() and page.locator("#answer-b").inner_text().strip()
        page.get_by_role("button", name="B is better", exact=True).click()
        expected.append("B")
        wait_votes(page, len(expected))
        with services.store.read() as cur:
            own = cur.execute(
                "SELECT p.text FROM comparisons c JOIN pairs q ON q.id = c.pair_id "
                "JOIN prompts p ON p.id = q.prompt_id WHERE q.strategy = 'own' AND c.annotator = 'alice'"
            ).fetchall()
        assert own == [("Tell me about rivers.",)]

        # Undo the last vote: a superseding row, the effective set shrinks by one.
        page.locator("h1").click()
        page.keyboard.press("u")
        page.get_by_text("Your last vote was undone").wait_for(timeout=10_000)
        assert [r[0] for r in effective(services, "alice")] == expected[:-1]
        page.close()


def test_bad_input_in_the_page_is_refused_and_no_script_runs(browser, tmp_path, tiny_model_dir):
    with running_app(tmp_path, tiny_model_dir, queue_size=2, wait_pairs=1) as (url, services):
        page = open_page(browser, url, "bob")
        page.get_by_text("Write your own prompt").click()
        go = page.get_by_role("button", name="Answer it", exact=True)
        page.locator("#own-prompt textarea").fill("   ")
        go.click()
        page.get_by_text("Type a prompt first.").wait_for(timeout=10_000)
        page.locator("#own-prompt textarea").fill("x" * 50_000)
        go.click()
        page.get_by_text("the limit is 8,000").wait_for(timeout=10_000)

        evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> hello'
        page.locator("#own-prompt textarea").fill(evil)
        go.click()
        page.get_by_text("Your pair is ready").wait_for(timeout=60_000)
        assert page.evaluate("window.__pwned") is None
        assert "onerror" in page.inner_text("body")  # shown as text, not markup

        # A vote on a pair whose lease expired is refused with a message; nothing is stored for it.
        with services.store.transaction() as cur:
            cur.execute("UPDATE pairs SET lease_expires = now() - INTERVAL 1 MINUTE WHERE leased_to = 'bob'")
        page.get_by_role("button", name="A is better", exact=True).click()
        page.get_by_text("⚠️").first.wait_for(timeout=10_000)
        assert effective(services, "bob") == []
        page.close()


def test_data_tab_imports_shows_errors_and_exports(browser, tmp_path, tiny_model_dir):
    good = tmp_path / "prefs.jsonl"
    good.write_text(
        '{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."}\n'
        '{"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "Rock."}\n',
        encoding="utf-8",
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Name a colour.", "chosen": "Blue."\n', encoding="utf-8")
    with running_app(tmp_path, tiny_model_dir, queue_size=1, wait_pairs=1) as (url, services):
        before = services.store.stats()["comparisons"]
        page = open_page(browser, url, "dana")
        page.get_by_role("tab", name="Data").click()
        page.locator("#import-file input[type=file]").set_input_files(str(broken))
        page.get_by_role("button", name="Import", exact=True).click()
        page.get_by_text("Import failed, nothing was written").wait_for(timeout=30_000)
        assert "broken.jsonl" in page.inner_text("body")
        assert services.store.stats()["comparisons"] == before
        page.locator("#import-file input[type=file]").set_input_files(str(good))
        page.get_by_role("button", name="Import", exact=True).click()
        page.get_by_text("✓ Imported").wait_for(timeout=30_000)
        assert services.store.stats()["comparisons"] == before + 2
        page.get_by_role("button", name="Export", exact=True).click()
        page.get_by_text("prefloop-dpo.jsonl").first.wait_for(timeout=30_000)
        page.close()

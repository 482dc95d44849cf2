"""What each role sees in a real Chromium, and hostile data rendered as inert text."""

from __future__ import annotations

import json

import pytest

from generation.sampling import Generation, SamplingParams
from storage.passwords import hash_password
from tests.apphelpers import running_app, wait_for
from tests.test_browser_label import browser  # noqa: F401 (the module-scoped browser fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ADMIN_IDS = ("train-start", "train-cancel", "train-activate", "version-activate", "import-btn", "export-btn")
PIXEL = "http://127.0.0.1:9/pixel.png"  # a remote image: must never be requested
XSS = [
    "<script>window.__xss = 1</script>",
    '<img src=x onerror="window.__xss = 2">',
    '```x```\n<img src=x onerror="window.__xss = 3">',  # a one-line fence must not flip into raw HTML
    '```\ncode\n```\n<svg onload="window.__xss = 4"></svg>',  # after a closed fence
    '```\n<img src=x onerror="window.__xss = 5">\n```',  # inside a fence
    "[click me](javascript:window.__xss=6)",
    '<a href="javascript:window.__xss=7">link</a>',
    f"![tracking pixel]({PIXEL})",
]


def login(browser, url: str, user: str, password: str):  # noqa: F811
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    page.goto(url)
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    page.get_by_text(f"Labeling as {user}").or_(page.get_by_text("Data")).first.wait_for(timeout=30_000)
    return page


def visible_ids(page) -> set[str]:
    return {eid for eid in ADMIN_IDS if page.locator(f"#{eid}").count() and page.locator(f"#{eid}").is_visible()}


def test_an_annotator_sees_no_admin_controls(browser, tmp_path, tiny_model_dir):  # noqa: F811
    users = {"alice": {"password": hash_password("a-pw"), "role": "admin"},
             "bob": {"password": hash_password("b-pw"), "role": "annotator"}}  # fmt: skip
    (tmp_path / "users.json").write_text(json.dumps(users))
    with running_app(tmp_path, tiny_model_dir, "--auth", str(tmp_path / "users.json"), queue_size=2) as (url, _):
        bob = login(browser, url, "bob", "b-pw")
        bob.get_by_text("Labeling as bob").wait_for(timeout=30_000)
        assert bob.locator("#display-name").count() == 0 or not bob.locator("#display-name").is_visible()
        bob.get_by_role("tab", name="Train").click()
        bob.get_by_text("Training and serving versions are for admins.").wait_for(timeout=10_000)
        assert visible_ids(bob) == set()
        bob.get_by_role("tab", name="Data").click()
        bob.get_by_text("Per choice").first.wait_for(timeout=10_000)
        assert visible_ids(bob) == set()
        bob.close()

        alice = login(browser, url, "alice", "a-pw")
        alice.get_by_role("tab", name="Data").click()
        alice.locator("#export-btn").wait_for(timeout=10_000)
        alice.get_by_role("tab", name="Train").click()
        alice.locator("#train-start").wait_for(timeout=10_000)
        alice.close()


def test_hostile_prompts_and_answers_render_as_inert_text(browser, tmp_path, tiny_model_dir):  # noqa: F811
    with running_app(tmp_path, tiny_model_dir, queue_size=2) as (url, services):
        params = SamplingParams(seed=1)
        for i, evil in enumerate(XSS):
            gen_a = Generation(f"A{i}: {evil}", 5, 1.0, params, 0)
            gen_b = Generation(f"B{i}: {evil}", 5, 1.0, params, 0)
            services.queue.add_own_pair("mallory", [{"role": "user", "content": f"P{i}: {evil}"}], gen_a, gen_b)
        page = browser.new_page(viewport={"width": 1300, "height": 1400})
        requested = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(url)
        page.get_by_label("Your display name (stored in this browser)").fill("mallory")
        page.get_by_role("button", name="Start labeling", exact=True).click()
        seen: set[int] = set()
        for _ in XSS:  # every hostile pair in turn (the order leases come back in is the queue's business)

            def next_hostile() -> int | None:
                shown = page.locator("#answer-a").inner_text()
                found = [i for i in range(len(XSS)) if i not in seen and f"A{i}:" in shown]
                return found[0] if found else None

            i = wait_for(lambda: [next_hostile()] if next_hostile() is not None else None, 30, "a hostile pair")[0]
            seen.add(i)
            for box in ("#prompt", "#answer-a", "#answer-b"):
                assert page.locator(f"{box} script, {box} img, {box} svg, {box} [onerror]").count() == 0, (i, box)
                hrefs = page.locator(f"{box} a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
                assert not any(h and h.lower().startswith("javascript") for h in hrefs), (i, hrefs)
            shown = page.locator("#answer-a").inner_text()
            assert any(word in shown for word in ("<", "javascript", "pixel")), shown  # visible as text
            page.get_by_role("button", name="Tie", exact=True).click()
            page.get_by_text("✓ Saved").first.wait_for(timeout=10_000)
        assert seen == set(range(len(XSS)))
        assert page.evaluate("window.__xss") is None
        assert PIXEL not in requested
        page.close()

"""A tab's timers tick only while it is shown: counted in the requests a real Chromium sends to the server."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.apphelpers import running_app
from tests.test_browser_label import browser, open_page  # noqa: F401 (the module-scoped browser fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def timers(url: str) -> dict[float, int]:
    """{interval in seconds: the timer's component id}, from the page's own config (one timer per interval)."""
    config = json.loads(urllib.request.urlopen(url + "config", timeout=10).read())
    found = {c["props"]["value"]: c["id"] for c in config["components"] if c.get("type") == "timer"}
    assert len(found) == sum(c.get("type") == "timer" for c in config["components"]), found
    return found


def calls_during(page, seconds: float, calls: list[int]) -> list[int]:
    """What the page sent meanwhile (Playwright's sync API delivers its events only while it is called: no sleep)."""
    start = len(calls)
    page.wait_for_timeout(seconds * 1000)
    return calls[start:]


def test_only_the_shown_tabs_timers_call_the_server(browser, tmp_path, tiny_model_dir):  # noqa: F811
    with running_app(tmp_path, tiny_model_dir, queue_size=2, wait_pairs=1) as (url, _services):
        ids = timers(url)
        watch, label_poll = ids[1.0], ids[2.0]  # the Train tab's run view (1 s); the Label tab's poll (2 s)
        others = set(ids.values()) - {label_poll}
        page = open_page(browser, url, "tina")
        calls: list[int] = []  # the trigger of every event the page sent

        def seen(request) -> None:
            if request.method == "POST" and "/queue/join" in request.url:  # what a tick sends: its timer's id
                calls.append(json.loads(request.post_data or "{}").get("trigger_id"))

        page.on("request", seen)
        # On the Label tab: its poll ticks, nothing of the other tabs does (the Train tab's watch ran every second).
        window = calls_during(page, 6.5, calls)
        assert window.count(label_poll) >= 2 and not others & set(window), window
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("usable preference pairs").wait_for(timeout=20_000)
        page.wait_for_timeout(1500)  # a poll already on its way may still land
        window = calls_during(page, 4.5, calls)
        assert window.count(watch) >= 3 and label_poll not in window, window
        page.get_by_role("tab", name="Label").click()
        page.wait_for_timeout(1500)
        window = calls_during(page, 4.5, calls)
        assert watch not in window and window.count(label_poll) >= 1, window
        page.close()

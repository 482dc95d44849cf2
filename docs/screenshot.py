"""Regenerate docs/label-tab.png: the real app on the bundled model, in headless Chromium.

.venv/bin/python docs/screenshot.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.apphelpers import running_app  # noqa: E402
from tests.test_browser_label import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def main() -> None:
    from playwright.sync_api import sync_playwright

    from models.loading import resolve_model

    model = Path(resolve_model("bundled", REPO / "data" / "models"))
    with tempfile.TemporaryDirectory() as tmp, running_app(Path(tmp), model, queue_size=2) as (url, _services):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.get_by_label("Your display name (stored in this browser)").fill("alice")
            page.get_by_role("button", name="Start labeling", exact=True).click()
            page.get_by_text("Labeling as alice").wait_for(timeout=30_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(REPO / "docs" / "label-tab.png"), full_page=False)
            browser.close()
    print("wrote docs/label-tab.png")


if __name__ == "__main__":
    main()

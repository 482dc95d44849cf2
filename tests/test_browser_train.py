"""The Train tab in a real Chromium: start DPO, watch progress and plots, activate; run the reward → PPO chain."""

from __future__ import annotations

import pytest

from tests.apphelpers import running_app, wait_for
from tests.datahelpers import seed_preferences
from tests.test_browser_label import browser, open_page  # noqa: F401 (the module-scoped browser fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def run_status(services, run_id: int) -> str:
    return services.runner.status(run_id).status


def open_train_tab(page):
    page.get_by_role("tab", name="Train").click()
    page.get_by_text("usable preference pairs").wait_for(timeout=20_000)


def test_train_dpo_watch_it_and_activate(browser, tmp_path, tiny_model_dir):  # noqa: F811
    with running_app(tmp_path, tiny_model_dir, queue_size=2, wait_pairs=1) as (url, services):
        seed_preferences(services.store, 12)
        page = open_page(browser, url, "erin")
        open_train_tab(page)
        page.get_by_label("Max steps (empty: epochs decide)").fill("40")
        page.get_by_text("Advanced").click()
        page.get_by_label("Batch size").fill("2")
        page.get_by_label("Max length (tokens)").fill("64")
        page.get_by_role("button", name="Start training", exact=True).click()
        page.get_by_text("✓ Run #1 started.").wait_for(timeout=30_000)
        page.locator("#run-progress").get_by_text("running").wait_for(timeout=60_000)
        wait_for(lambda: "step 0/" not in page.locator("#run-progress").inner_text(), 120, "the step counter to move")
        page.locator("canvas, svg.marks, .vega-embed").first.wait_for(timeout=60_000)  # the loss plot is drawn
        wait_for(lambda: run_status(services, 1) == "succeeded", 300, "the DPO run to succeed")
        page.get_by_role("button", name="Activate this run's model", exact=True).click()
        page.get_by_text("is now serving").wait_for(timeout=60_000)
        version = services.runner.status(1).result_version
        assert version is not None and services.engine.active_version == version
        assert services.store.get_setting("active_version") == str(version)
        page.close()


def test_reward_then_ppo_chain_from_the_page(browser, tmp_path, tiny_model_dir):  # noqa: F811
    with running_app(tmp_path, tiny_model_dir, queue_size=2, wait_pairs=1) as (url, services):
        seed_preferences(services.store, 12)
        page = open_page(browser, url, "frank")
        open_train_tab(page)
        page.get_by_text("Reward model → PPO").click()
        page.get_by_label("Max steps (empty: epochs decide)").fill("2")
        page.get_by_text("Advanced").click()
        page.get_by_label("Batch size").fill("2")
        page.get_by_label("Max length (tokens)").fill("64")
        page.get_by_label("PPO episodes").fill("4")
        page.get_by_label("PPO response length").fill("8")
        page.get_by_role("button", name="Start training", exact=True).click()
        page.get_by_text("✓ Run #1 started.").wait_for(timeout=30_000)
        wait_for(lambda: run_status(services, 1) == "succeeded", 300, "the reward model run")
        wait_for(lambda: services.runner.status(2) and run_status(services, 2) == "succeeded", 400, "the PPO run")
        ppo = services.runner.status(2)
        assert ppo.method == "ppo"
        version = services.store.get_version(ppo.result_version)
        assert version["reward_model_id"] == services.runner.status(1).result_version
        page.locator("#run-progress").get_by_text("Run #2 (ppo): succeeded").wait_for(timeout=30_000)
        page.close()

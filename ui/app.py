"""The Gradio app: `build_app(services, access)` wires the Label, Data, Leaderboard and Train tabs and the API.

Handlers are plain methods of small handler classes, one per tab; all state lives in the database, in
per-session `gr.State` and (for the display name without logins) in the browser's localStorage. Tabs an
account cannot use are hidden on load, but the components exist for everyone: the handlers check the caller.
"""

from __future__ import annotations

import gradio as gr

from labeling.access import Access
from labeling.services import Services
from ui.api import register_api
from ui.data_tab import EXPORT_KEEP_S, build_data_tab
from ui.label_tab import build_label_tab
from ui.leaderboard_tab import build_leaderboard_tab
from ui.train_tab import build_train_tab

DEFAULT_UPLOAD_MAX_ROWS = 200_000  # one browser upload; the operator's CLI import has no cap
SIGN_IN = "Sign in with Hugging Face (the button above) to label: your votes carry your Hugging Face username."
NO_LABELING = "Labeling needs an annotator account."


def build_app(
    services: Services, access: Access | None = None, title: str = "prefloop", upload_max_rows: int | None = None
) -> gr.Blocks:
    access = access or Access()
    # Files the app hands out (exports) are copied into Gradio's cache, which anyone holding the link may fetch:
    # copies older than an hour go, checked hourly (and all at shutdown).
    with gr.Blocks(title=title, delete_cache=(EXPORT_KEEP_S, EXPORT_KEEP_S)) as demo:
        gr.Markdown(f"# {title} — judge answers, train the model, repeat")
        if access.oauth:  # a Space without a users file: people sign in with their Hugging Face account
            gr.LoginButton(elem_id="hf-login")
        with gr.Tab("Label", elem_id="tab-label") as label_tab:
            label_note = gr.Markdown("", visible=False)
            with gr.Column(visible=False) as label_body:  # shown on load to those who may label
                label_timers = build_label_tab(services, access, demo, label_tab)
        with gr.Tab("Data", elem_id="tab-data") as data_tab:
            data_timers = build_data_tab(services, access, demo, data_tab, upload_max_rows or DEFAULT_UPLOAD_MAX_ROWS)
        with gr.Tab("Leaderboard", elem_id="tab-leaderboard") as board_tab:
            board_timers = build_leaderboard_tab(services, access, demo, board_tab)
        with gr.Tab("Train", elem_id="tab-train") as train_tab:
            train_note = gr.Markdown("", visible=False)
            with gr.Column(visible=False) as train_body:  # shown on load to admins
                train_timers = build_train_tab(services, access, demo, train_tab)
        _poll_only_the_shown_tab(
            [(label_tab, label_timers), (data_tab, data_timers), (board_tab, board_timers), (train_tab, train_timers)]
        )
        register_api(services, access)
        outputs = [label_body, label_note, train_body, train_note]
        demo.load(_visibility(access), None, outputs, api_visibility="private")
    return demo


def _visibility(access: Access):
    """Show each tab's controls to the roles that may use them, a one-line notice to the others."""

    def visible(request: gr.Request):
        who = access.caller(request)
        label, train = who.may("label"), who.may("train")
        return (
            gr.update(visible=label),
            gr.update(visible=not label, value=SIGN_IN if access.oauth and who.name is None else NO_LABELING),
            gr.update(visible=train),
            gr.update(visible=not train, value="Training and serving versions are for admins."),
        )

    return visible


def _poll_only_the_shown_tab(tabs: list[tuple[gr.Tab, list[gr.Timer]]]) -> None:
    """A tab's timers tick only while that tab is shown (the Label tab's at first): every tick of every open page is
    a server call, and a page left on the Label tab polled the Train tab's run every second. Each tab also refreshes
    once as it is selected (the build functions wire that)."""
    timers = [timer for _, own in tabs for timer in own]
    for tab, own in tabs:
        flags = [any(timer is mine for mine in own) for timer in timers]
        tab.select(lambda flags=flags: [gr.Timer(active=f) for f in flags], None, timers, api_visibility="private")

"""The Gradio app: `build_app(services)` wires the Label, Data and Train tabs and the named API endpoints.

Handlers are plain functions of their inputs; all state lives in the database, in per-session `gr.State`
and (for the display name) in the browser's localStorage.
"""

from __future__ import annotations

import time

import gradio as gr

from labeling.services import Services, UserError
from ui.data_tab import build_data_tab
from ui.render import escape_html, render_messages
from ui.train_tab import build_train_tab

HOTKEYS = {"1": "vote-a", "a": "vote-a", "2": "vote-b", "b": "vote-b", "3": "vote-tie", "t": "vote-tie",
           "4": "vote-bad", "x": "vote-bad", "s": "skip-btn", "u": "undo-btn"}  # fmt: skip
KEYBOARD_JS = (
    "<script>\nconst PREFLOOP_KEYS = "
    + str(HOTKEYS).replace("'", '"')
    + """;
document.addEventListener("keydown", (event) => {
  const tag = (event.target.tagName || "").toLowerCase();
  if (tag === "input" || tag === "textarea" || event.target.isContentEditable) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const id = PREFLOOP_KEYS[event.key.toLowerCase()];
  if (!id) return;
  const button = document.getElementById(id);
  if (button && !button.disabled) { event.preventDefault(); button.click(); }
});
</script>"""
)
CSS = ".answer { min-height: 8em; border: 1px solid var(--border-color-primary); padding: 0.5em; border-radius: 6px; }"
SHORTCUTS_MD = (
    "**Keys:** `1`/`a` A better · `2`/`b` B better · `3`/`t` tie · `4`/`x` both bad · `s` skip · `u` undo "
    "(not while typing in a box)."
)
EMPTY = "*Pairs are being generated…*"
STREAMING = "streaming"  # the hidden pair box while your own prompt is being answered (no vote, no polling)


def build_app(services: Services, title: str = "prefloop") -> gr.Blocks:
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title} — judge answers, train the model, repeat")
        who = gr.State("")
        name_store = gr.BrowserState("", storage_key="prefloop-annotator")
        with gr.Tab("Label"):
            build_label_tab(services, who, name_store, demo)
        with gr.Tab("Data"):
            build_data_tab(services, demo)
        with gr.Tab("Train"):
            build_train_tab(services, demo)
        _register_api(services)
    return demo


def build_label_tab(services: Services, who: gr.State, name_store: gr.BrowserState, demo: gr.Blocks) -> None:
    # The pair on screen lives in the page (a hidden box), so a vote always names the pair the person sees.
    pair = gr.Textbox("", visible=False, elem_id="pair-id")
    shown_at = gr.State(0.0)
    with gr.Group(visible=not services.auth_enabled) as name_box:
        with gr.Row():
            name_in = gr.Textbox(label="Your display name (stored in this browser)", scale=4)
            name_btn = gr.Button("Start labeling", variant="primary", scale=1)
    counters = gr.Markdown("")
    status = gr.Markdown("")
    prompt_md = gr.Markdown(EMPTY, label="Prompt")
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.Markdown("### Answer A")
            answer_a = gr.Markdown("", elem_id="answer-a", elem_classes="answer")
        with gr.Column():
            gr.Markdown("### Answer B")
            answer_b = gr.Markdown("", elem_id="answer-b", elem_classes="answer")
    with gr.Row():
        btn_a = gr.Button("A is better", elem_id="vote-a", variant="primary")
        btn_b = gr.Button("B is better", elem_id="vote-b", variant="primary")
        btn_tie = gr.Button("Tie", elem_id="vote-tie")
        btn_bad = gr.Button("Both bad", elem_id="vote-bad", variant="stop")
    rationale = gr.Textbox(label="Why? (optional)", lines=1, elem_id="rationale")
    with gr.Accordion("Edit the better answer (optional: stored as the corrected answer)", open=False):
        with gr.Row():
            from_a = gr.Button("Start from A", size="sm")
            from_b = gr.Button("Start from B", size="sm")
        edited = gr.Textbox(label="Corrected answer", lines=6, elem_id="edited")
    with gr.Row():
        skip_btn = gr.Button("Skip", elem_id="skip-btn", size="sm")
        undo_btn = gr.Button("Undo my last vote", elem_id="undo-btn", size="sm")
    gr.Markdown(SHORTCUTS_MD)
    with gr.Accordion("Write your own prompt: both sides answer live", open=False):
        own_prompt = gr.Textbox(label="Your prompt", lines=3, elem_id="own-prompt")
        own_btn = gr.Button("Answer it", elem_id="own-go")
    with gr.Accordion("Guidelines", open=False):
        gr.Markdown(services.guidelines or "Pick the answer that is more helpful, correct and honest.")
    timer = gr.Timer(2.0)  # polls the queue while no pair is shown (the page never waits on a button)

    shown = [pair, shown_at, prompt_md, answer_a, answer_b, rationale, edited, counters]

    def show(name: str):
        """The next pair for this person (or the 'being generated' notice), plus counters."""
        nxt = services.next_pair(name) if name else None
        counts = _counters(services, name)
        if nxt is None:
            progress = services.queue.progress()
            waiting = f"{EMPTY} ({progress.get('ready', 0)} ready, generating {progress.get('generating', 0)})"
            return "", 0.0, waiting, "", "", "", "", counts
        answers = escape_html(nxt["answer_a"]), escape_html(nxt["answer_b"])
        return str(nxt["pair_id"]), time.time(), render_messages(nxt["messages"]), *answers, "", "", counts

    def login(request: gr.Request, stored: str):
        name = (getattr(request, "username", None) or stored or "").strip()
        if not name:
            return "", gr.update(visible=True), *([gr.skip()] * len(shown)), ""
        return name, gr.update(visible=False), *show(name), f"Labeling as **{name}**."

    def set_name(typed: str):
        try:
            name = services.annotator_name(typed)
        except UserError as exc:
            return "", gr.skip(), gr.update(visible=True), *([gr.skip()] * len(shown)), f"⚠️ {exc}"
        return name, name, gr.update(visible=False), *show(name), f"Labeling as **{name}**."

    def cast(choice: str):
        def handler(name: str, current: str, started: float, why: str, fixed: str):
            if not current or current == STREAMING:
                return *([gr.skip()] * len(shown)), "⚠️ No pair on screen yet: it is being generated."
            try:
                services.vote(current, name, choice, why, fixed, round(time.time() - started, 2) if started else None)
            except UserError as exc:
                return *show(name), f"⚠️ {exc} (showing a fresh pair)"
            return *show(name), _receipt(choice, services.queue.pair_view(int(current)))

        return handler

    def undo(name: str):
        try:
            undone = services.undo(name)
        except UserError as exc:
            return f"⚠️ {exc}"
        return "Your last vote was undone." if undone else "Nothing to undo."

    def poll(name: str, current: str):
        if not name or current:
            return *([gr.skip()] * len(shown)), gr.skip()
        return *show(name), gr.skip()

    def own(name: str, text: str):
        try:
            services.annotator_name(name)
            messages = services.check_prompt(text)
        except UserError as exc:
            yield *([gr.skip()] * len(shown)), f"⚠️ {exc}"
            return
        yield STREAMING, 0.0, render_messages(messages), "", "", "", "", gr.skip(), "Both sides are answering…"
        text_a = text_b = ""
        stream = services.stream_own(name, messages)
        for text_a, text_b in stream:
            answers = escape_html(text_a), escape_html(text_b)
            yield gr.skip(), gr.skip(), gr.skip(), *answers, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        ready = str(stream.pair["pair_id"])
        answers = escape_html(text_a), escape_html(text_b)
        yield ready, time.time(), render_messages(messages), *answers, "", "", gr.skip(), "Your pair is ready: vote."

    demo.load(login, [name_store], [who, name_box, *shown, status])
    name_btn.click(set_name, [name_in], [who, name_store, name_box, *shown, status])
    name_in.submit(set_name, [name_in], [who, name_store, name_box, *shown, status])
    vote_inputs = [who, pair, shown_at, rationale, edited]
    for button, choice in ((btn_a, "A"), (btn_b, "B"), (btn_tie, "tie"), (btn_bad, "both_bad"), (skip_btn, "skip")):
        button.click(cast(choice), vote_inputs, [*shown, status], concurrency_limit=None, api_visibility="private")
    undo_btn.click(undo, [who], [status], api_visibility="private")
    from_a.click(lambda pid: _answer(services, pid, "answer_a"), [pair], [edited], api_visibility="private")
    from_b.click(lambda pid: _answer(services, pid, "answer_b"), [pair], [edited], api_visibility="private")
    timer.tick(poll, [who, pair], [*shown, status], api_visibility="private")
    own_btn.click(own, [who, own_prompt], [*shown, status], concurrency_limit=4, api_visibility="private")


def _answer(services: Services, pair_id: str, side: str) -> str:
    """The raw text of one side of the pair on screen (to start an edit from it)."""
    return services.queue.pair_view(int(pair_id))[side] if pair_id.isdigit() else ""


def _counters(services: Services, name: str) -> str:
    counts = services.counters(name)
    return (
        f"Your votes today: **{counts['mine_today']}** · all votes: **{counts['total']}** · "
        f"ready pairs: **{counts['queue']}**"
    )


def _receipt(choice: str, pair: dict) -> str:
    """Confirms the vote and reveals which model made which side (hidden until now)."""
    label = {"A": "A is better", "B": "B is better", "tie": "tie", "both_bad": "both bad", "skip": "skipped"}[choice]
    return (
        f"✓ Saved: **{label}**. A came from version {pair.get('version_a')}, B from version {pair.get('version_b')}."
    )


def _register_api(services: Services) -> None:
    def next_pair(annotator: str) -> tuple[int | None, str, str, str]:
        """Lease the next pair to `annotator`: (pair id, or None when the queue is empty; prompt; answer A; B)."""
        try:
            nxt = services.next_pair(annotator)
        except UserError as exc:
            raise gr.Error(str(exc)) from None
        if nxt is None:
            return None, "", "", ""
        return nxt["pair_id"], render_messages(nxt["messages"]), nxt["answer_a"], nxt["answer_b"]

    def vote(pair_id: int, annotator: str, choice: str, rationale: str = "", edited_answer: str = "") -> str:
        """Record a judgement of a leased pair: choice is A, B, tie, both_bad or skip. Returns "ok"."""
        try:
            services.vote(pair_id, annotator, choice, rationale, edited_answer)
        except UserError as exc:
            raise gr.Error(str(exc)) from None
        return "ok"

    gr.api(next_pair, api_name="next_pair", concurrency_limit=None)
    gr.api(vote, api_name="vote", concurrency_limit=None)


def launch_head() -> str:
    return KEYBOARD_JS

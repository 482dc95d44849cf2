"""The Label tab: one pair at a time, four verdicts, a rationale, an edited answer, your own prompt.

`build_label_tab` lays the page out and wires it; `LabelHandlers` holds what each event does. Every handler
asks `Access` who is calling first: under logins the login is the annotator, whatever the page sends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from labeling.access import Access, AccessDenied
from labeling.services import Services, UserError
from ui.assets import SHORTCUTS_MD
from ui.render import plain, render_messages, render_text

EMPTY = "<p><i>Pairs are being generated…</i></p>"
STREAMING = "streaming"  # the hidden pair box while your own prompt is being answered (no vote, no polling)
RECEIPT_LABELS = {"A": "A is better", "B": "B is better", "tie": "tie", "both_bad": "both bad", "skip": "skipped"}
VERDICTS = (
    ("vote-a", "A is better", "A", "primary"),
    ("vote-b", "B is better", "B", "primary"),
    ("vote-tie", "Tie", "tie", "secondary"),
    ("vote-bad", "Both bad", "both_bad", "stop"),
)


@dataclass
class LabelView:
    """The components a pair fills, in the order every show/vote handler returns them."""

    pair: gr.Textbox
    shown_at: gr.State
    prompt: gr.HTML
    answer_a: gr.HTML
    answer_b: gr.HTML
    rationale: gr.Textbox
    edited: gr.Textbox
    counters: gr.Markdown

    def outputs(self) -> list:
        return [
            self.pair,
            self.shown_at,
            self.prompt,
            self.answer_a,
            self.answer_b,
            self.rationale,
            self.edited,
            self.counters,
        ]


def build_label_tab(services: Services, access: Access, demo: gr.Blocks, tab: gr.Tab) -> list[gr.Timer]:
    """The Label tab's controls and handlers; returns its timers (ticking only while `tab` is shown)."""
    handlers = LabelHandlers(services, access)
    who = gr.State("")  # the annotator name of this page (checked against the login on every call)
    name_store = gr.BrowserState("", storage_key="prefloop-annotator")
    name_box, name_in, name_btn = _name_box(visible=not access.logins)
    status = gr.Markdown("")
    view = _pair_view()
    with gr.Row():
        buttons = {choice: gr.Button(label, elem_id=eid, variant=variant) for eid, label, choice, variant in VERDICTS}
    view.rationale = gr.Textbox(label="Why? (optional)", lines=1, elem_id="rationale")
    with gr.Accordion("Edit the better answer (optional: stored as the corrected answer)", open=False):
        with gr.Row():
            from_a = gr.Button("Start from A", size="sm", elem_id="from-a")
            from_b = gr.Button("Start from B", size="sm", elem_id="from-b")
        view.edited = gr.Textbox(label="Corrected answer", lines=6, elem_id="edited")
    with gr.Row():
        buttons["skip"] = gr.Button("Skip", elem_id="skip-btn", size="sm")
        undo_btn = gr.Button("Undo my last vote", elem_id="undo-btn", size="sm")
    gr.Markdown(SHORTCUTS_MD)
    with gr.Accordion("Write your own prompt: both sides answer live", open=False):
        own_prompt = gr.Textbox(label="Your prompt", lines=3, elem_id="own-prompt")
        own_btn = gr.Button("Answer it", elem_id="own-go")
    with gr.Accordion("Guidelines", open=False):
        gr.Markdown(services.guidelines or "Pick the answer that is more helpful, correct and honest.")

    shown, private = [*view.outputs(), status], {"api_visibility": "private"}
    demo.load(handlers.login, [name_store], [who, name_box, *shown], **private)
    name_in.submit(handlers.set_name, [name_in], [who, name_store, name_box, *shown], **private)
    name_btn.click(handlers.set_name, [name_in], [who, name_store, name_box, *shown], **private)
    vote_in = [who, view.pair, view.shown_at, view.rationale, view.edited]
    for choice, button in buttons.items():
        button.click(handlers.cast(choice), vote_in, shown, concurrency_limit=None, **private)
    undo_btn.click(handlers.undo, [who, view.pair], shown, **private)
    from_a.click(handlers.start_from("answer_a"), [who, view.pair], [view.edited], **private)
    from_b.click(handlers.start_from("answer_b"), [who, view.pair], [view.edited], **private)
    poll = gr.Timer(2.0)  # fills an empty page when pairs arrive (the Label tab is the one shown first)
    poll.tick(handlers.poll, [who, view.pair], shown, **private)
    tab.select(handlers.poll, [who, view.pair], shown, **private)
    own_btn.click(handlers.own, [who, own_prompt], shown, concurrency_limit=4, **private)
    return [poll]


def _name_box(visible: bool):
    with gr.Group(visible=visible) as name_box:
        with gr.Row():
            name_in = gr.Textbox(label="Your display name (stored in this browser)", scale=4, elem_id="display-name")
            name_btn = gr.Button("Start labeling", variant="primary", scale=1)
    return name_box, name_in, name_btn


def _pair_view() -> LabelView:
    # The pair on screen lives in the page (a hidden box), so a vote always names the pair the person sees.
    pair = gr.Textbox("", visible=False, elem_id="pair-id")
    counters = gr.Markdown("")
    prompt = gr.HTML(EMPTY, label="Prompt", elem_id="prompt")
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.Markdown("### Answer A")
            answer_a = gr.HTML("", elem_id="answer-a", elem_classes="answer")
        with gr.Column():
            gr.Markdown("### Answer B")
            answer_b = gr.HTML("", elem_id="answer-b", elem_classes="answer")
    return LabelView(pair, gr.State(0.0), prompt, answer_a, answer_b, None, None, counters)


class LabelHandlers:
    """What each Label-tab event does. Returns match `LabelView.outputs()` plus the status line."""

    def __init__(self, services: Services, access: Access):
        self.services, self.access = services, access

    def show(self, name: str) -> tuple:
        """The next pair for this person (or the 'being generated' notice), plus counters."""
        nxt = self.services.next_pair(name) if name else None
        counts = self.counters(name)
        if nxt is None:
            progress = self.services.queue.progress()
            waiting = f"{EMPTY[:-4]} ({progress.get('ready', 0)} ready, generating {progress.get('generating', 0)})"
            return "", 0.0, waiting + "</p>", "", "", "", "", counts
        answers = render_answer(nxt, "a"), render_answer(nxt, "b")
        return str(nxt["pair_id"]), time.time(), render_messages(nxt["messages"]), *answers, "", "", counts

    def counters(self, name: str) -> str:
        counts = self.services.counters(name)
        return (
            f"Your votes today: **{counts['mine_today']}** · all votes: **{counts['total']}** · "
            f"ready pairs: **{counts['queue']}**"
        ) + _served_model_problem(self.services.queue)

    def login(self, stored: str, request: gr.Request) -> tuple:
        """Page load: the login (under auth) or the name this browser stored."""
        skip = [gr.skip()] * 8
        try:
            name = self.access.annotator(request, None) or self.access.annotator(request, (stored or "").strip())
            name = self.services.annotator_name(name) if name else name
        except AccessDenied as exc:
            return "", gr.update(visible=False), *skip, f"⚠️ {plain(exc)}"
        except UserError as exc:  # a stored or login name the store refuses: say why (typing another may work)
            return "", gr.update(visible=not self.access.logins), *skip, f"⚠️ {plain(exc)}"
        if not name:
            return "", gr.update(visible=True), *skip, ""
        return name, gr.update(visible=False), *self.show(name), f"Labeling as **{plain(name)}**."

    def set_name(self, typed: str, request: gr.Request) -> tuple:
        try:
            name = self.services.annotator_name(self.access.annotator(request, typed))
        except (UserError, AccessDenied) as exc:
            return "", gr.skip(), gr.update(visible=True), *([gr.skip()] * 8), f"⚠️ {plain(exc)}"
        return name, name, gr.update(visible=False), *self.show(name), f"Labeling as **{plain(name)}**."

    def cast(self, choice: str):
        def handler(name: str, current: str, started: float, why: str, fixed: str, request: gr.Request):
            try:
                name = self.access.annotator(request, name)
            except AccessDenied as exc:
                return *([gr.skip()] * 8), f"⚠️ {plain(exc)}"
            if not current or current == STREAMING:
                return *([gr.skip()] * 8), "⚠️ No pair on screen yet: it is being generated."
            seconds = round(time.time() - started, 2) if started else None
            try:
                self.services.vote(current, name, choice, why, fixed, seconds)
            except UserError as exc:
                return *self.show(name), f"⚠️ {plain(exc)} (showing a fresh pair)"
            return *self.show(name), receipt(choice, self.services.queue.pair_view(int(current)))

        return handler

    def undo(self, name: str, current: str, request: gr.Request) -> tuple:
        """Undo the latest vote or skip; the pair it was about is shown again at once to judge anew."""
        if current == STREAMING:  # its answers would be drawn over the pair undo shows
            return *([gr.skip()] * 8), "⚠️ Your own prompt is being answered: undo when it is ready."
        try:
            name = self.access.annotator(request, name)
            undone = self.services.undo(name)
        except (UserError, AccessDenied) as exc:
            return *([gr.skip()] * 8), f"⚠️ {plain(exc)}"
        if not undone:
            return *([gr.skip()] * 8), "Nothing to undo."
        return *self.show(name), "Your last vote was undone: judge the pair again."

    def start_from(self, side: str):
        def handler(name: str, pair_id: str, request: gr.Request) -> str:
            """The raw text of one side of the pair this person holds (to start an edit from it)."""
            try:
                return self.services.pair_answer(pair_id, side, self.access.annotator(request, name))
            except (UserError, AccessDenied) as exc:
                raise gr.Error(str(exc)) from None

        return handler

    def poll(self, name: str, current: str, request: gr.Request) -> tuple:
        if not name or current:
            return *([gr.skip()] * 8), gr.skip()
        try:
            name = self.access.annotator(request, name)
        except AccessDenied:
            return *([gr.skip()] * 8), gr.skip()
        return *self.show(name), gr.skip()

    def own(self, name: str, text: str, request: gr.Request):
        skip = [gr.skip()] * 8
        try:
            name = self.services.annotator_name(self.access.annotator(request, name))
            messages = self.services.check_prompt(text)
            stream = self.services.stream_own(name, messages)
        except (UserError, AccessDenied) as exc:
            yield *skip, f"⚠️ {plain(exc)}"
            return
        text_a = text_b = ""
        try:
            with stream:  # leaving early (the browser went away) cancels both sides in the engine
                yield STREAMING, 0.0, render_messages(messages), "", "", "", "", gr.skip(), "Both sides are answering…"
                for text_a, text_b in stream:
                    yield *skip[:3], render_text(text_a), render_text(text_b), *skip[5:], gr.skip()
        except Exception as exc:  # the engine failed or the pair could not be stored: the page must not stay stuck
            yield *self.show(name), f"⚠️ Your prompt could not be answered: {plain(str(exc))}"
            return
        answers = render_text(text_a), render_text(text_b)
        ready = str(stream.pair["pair_id"])
        yield ready, time.time(), render_messages(messages), *answers, "", "", gr.skip(), "Your pair is ready: vote."


def render_answer(pair: dict, side: str) -> str:
    """One side of a pair as safe HTML, marked when the answer was cut at the token limit."""
    text = render_text(pair[f"answer_{side}"])
    if pair.get(f"truncated_{side}"):
        text += '<p class="truncated">✂ cut at the length limit: this answer did not finish</p>'
    return text


def receipt(choice: str, pair: dict) -> str:
    """Confirms the vote and reveals which model made which side (hidden until now)."""
    return (
        f"✓ Saved: **{RECEIPT_LABELS[choice]}**. A came from {_author(pair.get('version_a'))}, "
        f"B from {_author(pair.get('version_b'))}."
    )


def _author(version) -> str:
    """A local version by number; a served model (endpoint pairs) or an imported one by its name."""
    return f"the model {plain(version)}" if isinstance(version, str) else f"version {version}"


def _served_model_problem(queue) -> str:
    """A line under the counters while the served model of endpoint pairs fails (labeling/endpoint_pairs.py)."""
    served = getattr(queue, "endpoint", None)
    problem = served.status() if served is not None else None
    return f"  \n⚠️ {plain(problem)}" if problem else ""

"""The Train tab: pick a method, check the data, start with one click, watch it live, activate the result.

Every handler here is an admin action or reveals runs, so each checks the caller first (`train` / `serve`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from labeling.access import Access, AccessDenied
from labeling.services import Services, UserError
from storage.promotions import same_base
from training.datamix import DEFAULT_METHOD
from training.runner import RunRejected
from ui.train_settings import FIELDS, METHODS, parse_settings, submit

ENDED = ("succeeded", "failed", "cancelled")
KEEP = object()  # TrainHandlers.overview: leave the reward model's pick as the page has it
PLOT_POINTS = 500  # progress steps plotted per run at most (a long run is thinned evenly)
BASIC = ("max_steps", "learning_rate", "beta")
ADVANCED_ROWS = (
    ("epochs", "batch_size", "max_length", "seed"),
    ("lora_r", "lora_alpha", "lora_dropout"),
    ("total_episodes", "response_length", "kl_coef"),
)


@dataclass
class Overview:
    usable: gr.Markdown
    parent: gr.Dropdown
    reward_model: gr.Dropdown
    run_pick: gr.Dropdown
    versions: gr.Dataframe
    version_pick: gr.Dropdown
    newest_seen: gr.State

    def outputs(self) -> list:
        return [
            self.usable,
            self.parent,
            self.reward_model,
            self.run_pick,
            self.versions,
            self.version_pick,
            self.newest_seen,
        ]


def build_train_tab(services: Services, access: Access, demo: gr.Blocks, tab: gr.Tab) -> list[gr.Timer]:
    """The Train tab's controls and handlers; returns its timers (ticking only while `tab` is shown)."""
    handlers = TrainHandlers(services, access)
    usable = gr.Markdown("")
    with gr.Row():
        default = next(label for label, name in METHODS.items() if name == DEFAULT_METHOD)
        method = gr.Radio(list(METHODS), value=default, label="Method", elem_id="train-method")
        parent = gr.Dropdown(label="Train on top of version (empty: the serving one)", choices=[], value=None)
    fields, reward_model = _settings_form()
    _training_switch(services, handlers, demo)
    start = gr.Button("Start training", variant="primary", elem_id="train-start")
    message = gr.Markdown("")
    gr.Markdown("### Runs")
    run_pick = gr.Dropdown(label="Run", choices=[], value=None, elem_id="run-pick", allow_custom_value=True)
    watch_out = _run_view()
    gr.Markdown("### Model versions")
    versions = gr.Dataframe(label="Versions", interactive=False)
    with gr.Row():
        version_pick = gr.Dropdown(label="Version", choices=[], value=None, allow_custom_value=True)
        version_btn = gr.Button("Serve this version", elem_id="version-activate")
    over = Overview(usable, parent, reward_model, run_pick, versions, version_pick, gr.State(None))

    handlers.form = {"method": method, "parent": parent, **fields, "reward_model": reward_model}
    private, over_out = {"api_visibility": "private"}, over.outputs()
    start.click(handlers.launch, set(handlers.form.values()), [message, *over_out], **private)
    shown = gr.State(None)  # what the run view shows: the timer sends nothing while the run is unchanged
    watch, overview = gr.Timer(1.0, active=False), gr.Timer(5.0, active=False)  # the picked run live; the rest
    for event in (watch.tick, tab.select):
        event(handlers.watch, [run_pick, shown], [*watch_out, shown], **private)
    for event in (overview.tick, tab.select):
        event(handlers.overview, [run_pick, over.newest_seen, reward_model], over_out, **private)
    run_pick.change(handlers.watch, [run_pick], [*watch_out, shown], **private)
    watch_out[6].click(handlers.cancel, [run_pick], [message], **private)
    watch_out[7].click(handlers.activate_run, [run_pick], [message, *over_out], **private)
    version_btn.click(handlers.serve_version, [version_pick, run_pick], [message, *over_out], **private)
    demo.load(handlers.overview, None, over_out, **private)
    return [watch, overview]


def _settings_form() -> tuple[dict[str, gr.Textbox], gr.Dropdown]:
    with gr.Row():
        fields = {name: _field(name) for name in BASIC}
    with gr.Accordion("Advanced", open=False):
        for row in ADVANCED_ROWS:
            with gr.Row():
                fields.update({name: _field(name) for name in row})
                if "kl_coef" in row:
                    reward_model = gr.Dropdown(label="Reward model for PPO", choices=[], value=None)
    return fields, reward_model


def _field(name: str) -> gr.Textbox:
    """An optional setting: empty keeps the method's default (the placeholder says so)."""
    return gr.Textbox(label=FIELDS[name][0], placeholder="default", max_lines=1)


def _run_view() -> list:
    """Progress bar, plots, buttons, metrics, before/after and log of the picked run (TrainHandlers.watch order)."""
    progress = gr.HTML("")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="metric", label="Loss", height=250)
        acc_plot = gr.LinePlot(x="step", y="value", color="metric", label="Reward / accuracy", height=250)
    with gr.Row():
        cancel = gr.Button("Cancel run", variant="stop", elem_id="train-cancel")
        activate = gr.Button("Activate this run's model", variant="primary", elem_id="train-activate")
    metrics = gr.JSON(label="Final metrics")
    before_after = gr.Dataframe(label="Before / after on held-out prompts", wrap=True, interactive=False)
    log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=12, autoscroll=True)
    return [progress, loss_plot, acc_plot, metrics, before_after, log, cancel, activate]


class TrainHandlers:
    def __init__(self, services: Services, access: Access):
        self.services, self.access = services, access
        self.form: dict[str, gr.components.Component] = {}  # the Train form's inputs by setting name

    def overview(self, picked=None, newest_seen=None, reward_picked=None, request: gr.Request = None):
        """Counts, versions and runs; the run picker follows the newest run unless you picked an older one, and the
        PPO reward model stays the one picked (the newest when none is, or the picked one is gone)."""
        if not self.access.caller(request).may("train"):
            return ["Training is for admins."] + [gr.skip()] * 6
        services = self.services
        active = services.engine.active_version
        policies, rewards = services.store.list_versions("policy"), services.store.list_versions("reward")
        choices = [(f"v{v['id']}" + (" (serving)" if v["id"] == active else ""), v["id"]) for v in policies]
        reward_choices = [  # only what PPO's submit accepts (the runner's own rule): another base's cannot score
            (f"reward model {v['id']} (acc {_acc(v)})", v["adapter_path"])
            for v in rewards
            if same_base(v.get("base_model"), services.runner.base_model)
        ]
        run_choices = [(f"#{r['id']} {r['method']} — {r['status']}", r["id"]) for r in services.runner.runs()]
        newest = run_choices[0][1] if run_choices else None
        follow = picked is None or (newest_seen is not None and newest != newest_seen)
        if reward_picked is KEEP:  # a handler without the dropdown among its inputs: only the choices change
            reward = gr.update(choices=reward_choices)
        elif reward_picked in [path for _, path in reward_choices]:
            reward = gr.update(choices=reward_choices, value=reward_picked)
        else:
            reward = gr.update(choices=reward_choices, value=reward_choices[-1][1] if reward_choices else None)
        return (
            f"**{services.runner.usable_pairs()}** usable preference pairs (A/B votes and edited answers) · "
            f"serving **v{active}**",
            gr.update(choices=choices),
            reward,
            gr.update(choices=run_choices, value=newest if follow else picked),
            _versions_table(policies + rewards, active),
            gr.update(choices=choices),
            newest,
        )

    def launch(self, values: dict, request: gr.Request):
        """Validate and queue a run from the form (a dict by component); empty fields keep the method's defaults."""
        reward = values.get(self.form["reward_model"])
        try:
            self.access.require(request, "train")
            if blocked := _training_blocked(self.services):
                raise UserError(blocked)
            form = {name: values.get(component) for name, component in self.form.items()}
            kind, parent_id = form.pop("method"), form.pop("parent")
            parent_id = self.services.engine.active_version if parent_id in (None, "") else int(parent_id)
            run_id = submit(self.services.runner, METHODS[kind], parse_settings(form), parent_id)
        except (RunRejected, UserError, AccessDenied, KeyError, ValueError) as exc:
            return f"⚠️ Not started: {exc}", *self.overview(reward_picked=reward, request=request)
        why = self.services.runner.status(run_id).message  # Auto says which method it chose, and why
        return f"✓ Run #{run_id} started.{' ' + why if why else ''}", *self.overview(
            reward_picked=reward, request=request
        )

    def training_state(self, request: gr.Request = None):
        """The CPU Space notice and the toggle's state (on when an admin or PREFLOOP_ALLOW_TRAINING allowed it)."""
        if not self.access.caller(request).may("train"):
            return gr.skip(), gr.skip()
        blocked, by_env = _training_blocked(self.services), self.services.training_switch.allowed_by_env()
        note = f"⚠️ {blocked}" if blocked else "Training is on for this CPU Space: runs share the CPU with labeling."
        return note, gr.update(value=blocked is None, interactive=not by_env)

    def allow_training(self, on: bool, request: gr.Request):
        try:
            self.access.require(request, "train")
        except AccessDenied as exc:
            return f"⚠️ {exc}", gr.skip()
        self.services.training_switch.set_allowed(bool(on))
        return self.training_state(request)

    def watch(self, run_id, shown=None, request: gr.Request = None):
        """The picked run's view, and what it shows (`shown`: nothing is sent while that is unchanged; a finished
        run's plots were sent again every second)."""
        hidden = ("", None, None, None, None, "", gr.update(visible=False), gr.update(visible=False), None)
        if run_id is None or not self.access.caller(request).may("train"):
            return hidden
        try:
            status = self.services.runner.status(int(run_id))
        except (TypeError, ValueError):  # the picker takes typed text: "abc" is no run
            return hidden
        if status is None:
            return hidden
        now = (int(run_id), status.status, len(status.progress), status.log_tail, status.error, bool(status.metrics))
        if now == shown:
            return [gr.skip()] * 9
        ended = status.status in ENDED
        can_activate = status.status == "succeeded" and status.method != "reward"  # every other method: a policy
        return (
            _progress_html(status),
            _series(status.progress, ("loss", "policy_loss", "value_loss")),
            _series(status.progress, ("reward_accuracy", "accuracy", "reward_margin", "reward", "kl")),
            status.metrics or None,
            _before_after(status.metrics),
            (status.error or status.log_tail) if (ended or status.log_tail) else "",
            gr.update(visible=not ended),
            gr.update(visible=can_activate),
            now,
        )

    def cancel(self, run_id, request: gr.Request) -> str:
        try:
            self.access.require(request, "train")
            if run_id is None:
                return "No run selected."
            return f"Run #{run_id}: {self.services.runner.cancel(int(run_id))}."
        except (RunRejected, AccessDenied, ValueError) as exc:
            return f"⚠️ {exc}"

    def activate_run(self, run_id, request: gr.Request):
        try:
            who = self.access.require(request, "serve")
            status = self.services.runner.status(int(run_id)) if run_id is not None else None
            if not status or status.result_version is None:
                raise UserError("This run has no model version to activate.")
            done = self.services.activate(status.result_version, actor=who.name or "admin")  # an override row
            return done, *self.overview(run_id, reward_picked=KEEP, request=request)
        except (UserError, AccessDenied, ValueError) as exc:
            return f"⚠️ {exc}", *self.overview(run_id, reward_picked=KEEP, request=request)

    def serve_version(self, version_id, picked, request: gr.Request):
        try:
            who = self.access.require(request, "serve")
            done = self.services.activate(int(version_id), actor=who.name or "admin")  # override or rollback row
            return done, *self.overview(picked, reward_picked=KEEP, request=request)
        except (UserError, AccessDenied, TypeError, ValueError) as exc:
            return f"⚠️ {exc}", *self.overview(picked, reward_picked=KEEP, request=request)


def _training_switch(services: Services, handlers: TrainHandlers, demo: gr.Blocks) -> None:
    """On a CPU Space only: why training is off and the admin toggle that allows it (kept in app_settings)."""
    if services.training_switch is None or not services.training_switch.cpu_space:
        return
    notice = gr.Markdown("", elem_id="training-off")
    allow = gr.Checkbox(label="Allow training on this CPU Space", value=False, elem_id="allow-training")
    allow.input(handlers.allow_training, [allow], [notice, allow], api_visibility="private")
    demo.load(handlers.training_state, None, [notice, allow], api_visibility="private")


def _training_blocked(services: Services) -> str | None:
    return services.training_switch.blocked() if services.training_switch is not None else None


def _versions_table(versions: list[dict], active: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "version": v["id"],
                "kind": v.get("kind"),
                "parent": v.get("parent_id"),
                "run": v.get("run_id"),
                "serving": v["id"] == active,
                "status": v.get("status"),
                "notes": v.get("notes"),
                "created": str(v.get("created_at")),
            }
            for v in versions
        ]
    )


def _acc(version: dict) -> str:
    metrics = version.get("metrics") or {}
    value = metrics.get("eval_accuracy", metrics.get("accuracy"))
    return f"{value:.2f}" if isinstance(value, int | float) else "?"


def _progress_html(status) -> str:
    last = status.last
    total, step = last.get("total") or 0, last.get("step") or 0
    done = 100 if status.status == "succeeded" else (100 * step / total if total else 0)
    eta = last.get("eta")
    eta_text = f" · ETA {eta:.0f} s" if isinstance(eta, int | float) and status.status == "running" else ""
    scoring = status.progress[-1] if status.progress and status.progress[-1].get("event") == "scoring" else None
    if scoring and status.status == "running":  # a reward model, trained, scores the stored answers (can be long)
        eta_text = f" · scoring the stored answers: {scoring.get('done')}/{scoring.get('total')}"
    reason = f"<div class='run-reason'>{html.escape(status.message)}</div>" if status.message else ""  # Auto's pick
    return (
        f"<div id='run-progress'><b>Run #{status.id} ({html.escape(status.method)}): {html.escape(status.status)}"
        f"</b> · step {step}/{total}{eta_text}{reason}"
        f"<div style='background:#ddd;height:12px;border-radius:6px'><div style='width:{done:.0f}%;height:12px;"
        f"background:#4a8;border-radius:6px'></div></div></div>"
    )


def _series(events: list[dict], keys: tuple[str, ...]) -> pd.DataFrame | None:
    rows = [
        {"step": e.get("step", 0), "metric": key, "value": float(e[key])}
        for e in _thinned(events)
        for key in keys
        if isinstance(e.get(key), int | float)
    ]
    return pd.DataFrame(rows) if rows else None


def _thinned(events: list[dict]) -> list[dict]:
    """Progress and eval events to plot: every eval, and at most about PLOT_POINTS progress steps evenly spread (the
    last one always), so a 20,000-step run redraws every second as cheaply as a short one."""
    progress = [i for i, e in enumerate(events) if e.get("event") == "progress"]
    stride = max(1, -(-len(progress) // PLOT_POINTS))
    kept = set(progress[::stride]) | set(progress[-1:])
    return [e for i, e in enumerate(events) if i in kept or e.get("event") == "eval"]


def _before_after(metrics: dict | None) -> pd.DataFrame | None:
    samples = (metrics or {}).get("before_after", {}).get("samples") if metrics else None
    return pd.DataFrame(samples) if samples else None

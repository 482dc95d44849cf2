"""The Train tab: pick a method, check the data, start one click, watch it live, activate the result."""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from labeling.services import Services, UserError
from training.runner import RunRejected

METHODS = {"DPO": "dpo", "Reward model": "reward", "PPO": "ppo", "Reward model → PPO": "chain"}
ENDED = ("succeeded", "failed", "cancelled")


def build_train_tab(services: Services, demo: gr.Blocks) -> None:
    usable = gr.Markdown("")
    with gr.Row():
        method = gr.Radio(list(METHODS), value="DPO", label="Method", elem_id="train-method")
        parent = gr.Dropdown(label="Train on top of version (empty: the serving one)", choices=[], value=None)
    with gr.Row():
        max_steps = _field("Max steps (empty: epochs decide)")
        learning_rate = _field("Learning rate (empty: default)")
        beta = _field("DPO beta (empty: default)")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            epochs = _field("Epochs")
            batch_size = _field("Batch size")
            max_length = _field("Max length (tokens)")
            seed = _field("Seed")
        with gr.Row():
            lora_r = _field("LoRA r")
            lora_alpha = _field("LoRA alpha")
            lora_dropout = _field("LoRA dropout")
        with gr.Row():
            total_episodes = _field("PPO episodes")
            response_length = _field("PPO response length")
            kl_coef = _field("PPO KL coefficient")
            reward_model = gr.Dropdown(label="Reward model for PPO", choices=[], value=None)
    start = gr.Button("Start training", variant="primary", elem_id="train-start")
    message = gr.Markdown("")
    gr.Markdown("### Runs")
    run_pick = gr.Dropdown(label="Run", choices=[], value=None, elem_id="run-pick")
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
    gr.Markdown("### Model versions")
    versions = gr.Dataframe(label="Versions", interactive=False)
    with gr.Row():
        version_pick = gr.Dropdown(label="Version", choices=[], value=None)
        version_btn = gr.Button("Serve this version", elem_id="version-activate")

    settings_in = [max_steps, learning_rate, beta, epochs, batch_size, max_length, seed, lora_r, lora_alpha,
                   lora_dropout, total_episodes, response_length, kl_coef, reward_model]  # fmt: skip
    names = ["max_steps", "learning_rate", "beta", "epochs", "batch_size", "max_length", "seed", "lora_r",
             "lora_alpha", "lora_dropout", "total_episodes", "response_length", "kl_coef", "reward_model"]  # fmt: skip

    def overview(picked=None, newest_seen=None):
        """Counts, versions and runs; the run picker follows the newest run unless you picked an older one."""
        pairs = services.runner.usable_pairs()
        policies = services.store.list_versions("policy")
        rewards = services.store.list_versions("reward")
        active = services.engine.active_version
        choices = [(f"v{v['id']}" + (" (serving)" if v["id"] == active else ""), v["id"]) for v in policies]
        reward_choices = [(f"reward model {v['id']} (acc {_acc(v)})", v["adapter_path"]) for v in rewards]
        runs = services.runner.runs()
        run_choices = [(f"#{r['id']} {r['method']} — {r['status']}", r["id"]) for r in runs]
        table = pd.DataFrame(
            [{"version": v["id"], "kind": v.get("kind"), "parent": v.get("parent_id"), "run": v.get("run_id"),
              "serving": v["id"] == active, "notes": v.get("notes"), "created": str(v.get("created_at"))}
             for v in policies + rewards]
        )  # fmt: skip
        newest = run_choices[0][1] if run_choices else None
        follow = picked is None or (newest_seen is not None and newest != newest_seen)
        return (
            f"**{pairs}** usable preference pairs (A/B votes and edited answers) · serving **v{active}**",
            gr.update(choices=choices),
            gr.update(choices=reward_choices, value=reward_choices[-1][1] if reward_choices else None),
            gr.update(choices=run_choices, value=newest if follow else picked),
            table,
            gr.update(choices=choices),
            newest,
        )

    def launch(kind: str, parent_id, *values):
        """Validate and queue a run from the form; empty fields keep the method's defaults."""
        parent_id = services.engine.active_version if parent_id in (None, "") else int(parent_id)
        try:
            settings = _parse_settings(names, values)
            run_id = _submit(services, METHODS[kind], settings, parent_id)
        except (RunRejected, UserError) as exc:
            return f"⚠️ Not started: {exc}", *overview()
        return f"✓ Run #{run_id} started.", *overview()

    def watch(run_id):
        if run_id is None:
            return "", None, None, None, None, "", gr.update(visible=False), gr.update(visible=False)
        status = services.runner.status(int(run_id))
        if status is None:
            return "", None, None, None, None, "", gr.update(visible=False), gr.update(visible=False)
        ended = status.status in ENDED
        can_activate = status.status == "succeeded" and status.method in ("dpo", "ppo")
        return (
            _progress_html(status),
            _series(status.progress, ("loss", "policy_loss", "value_loss")),
            _series(status.progress, ("reward_accuracy", "accuracy", "reward_margin", "reward", "kl")),
            status.metrics or None,
            _before_after(status.metrics),
            (status.error or status.log_tail) if (ended or status.log_tail) else "",
            gr.update(visible=not ended),
            gr.update(visible=can_activate),
        )

    def do_cancel(run_id):
        if run_id is None:
            return "No run selected."
        try:
            return f"Run #{run_id}: {services.runner.cancel(int(run_id))}."
        except RunRejected as exc:
            return f"⚠️ {exc}"

    def do_activate(run_id):
        status = services.runner.status(int(run_id)) if run_id is not None else None
        if not status or status.result_version is None:
            return "⚠️ This run has no model version to activate.", *overview(run_id)
        try:
            return services.activate(status.result_version), *overview(run_id)
        except UserError as exc:
            return f"⚠️ {exc}", *overview(run_id)

    def do_version(version_id, picked):
        try:
            return services.activate(int(version_id)), *overview(picked)
        except (UserError, TypeError, ValueError) as exc:
            return f"⚠️ {exc}", *overview(picked)

    newest_seen = gr.State(None)
    over_in = [run_pick, newest_seen]
    over_out = [usable, parent, reward_model, run_pick, versions, version_pick, newest_seen]
    watch_out = [progress, loss_plot, acc_plot, metrics, before_after, log, cancel, activate]
    start.click(launch, [method, parent, *settings_in], [message, *over_out], api_visibility="private")
    gr.Timer(1.0).tick(watch, [run_pick], watch_out, api_visibility="private")  # live view of the picked run
    gr.Timer(5.0).tick(overview, over_in, over_out, api_visibility="private")
    run_pick.change(watch, [run_pick], watch_out, api_visibility="private")
    cancel.click(do_cancel, [run_pick], [message], api_visibility="private")
    activate.click(do_activate, [run_pick], [message, *over_out], api_visibility="private")
    version_btn.click(do_version, [version_pick, run_pick], [message, *over_out], api_visibility="private")
    demo.load(overview, None, over_out, api_visibility="private")


INTEGER_FIELDS = {"max_steps", "batch_size", "max_length", "seed", "lora_r", "lora_alpha", "total_episodes",
                  "response_length"}  # fmt: skip
TEXT_FIELDS = {"reward_model"}


def _field(label: str) -> gr.Textbox:
    """An optional setting: empty keeps the method's default (the placeholder says so)."""
    return gr.Textbox(label=label, placeholder="default", max_lines=1)


def _parse_settings(names: list[str], values: tuple) -> dict:
    """Form values → run settings; empty fields are left out, anything not a number is refused with its name."""
    settings = {}
    for name, value in zip(names, values, strict=True):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if name in TEXT_FIELDS:
            settings[name] = value
            continue
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            raise UserError(f"{name.replace('_', ' ')}: {text!r} is not a number") from None
        if name in INTEGER_FIELDS:
            if not number.is_integer():
                raise UserError(f"{name.replace('_', ' ')}: {text!r} must be a whole number")
            number = int(number)
        settings[name] = number
    return settings


def _submit(services: Services, kind: str, settings: dict, parent_id: int) -> int:
    reward_keys = {"max_steps", "learning_rate", "epochs", "batch_size", "max_length", "seed", "lora_r", "lora_alpha",
                   "lora_dropout"}  # fmt: skip
    if kind == "chain":
        reward_settings = {k: v for k, v in settings.items() if k in reward_keys}
        ppo_settings = {k: v for k, v in settings.items() if k not in ("reward_model", "beta")}
        return services.runner.submit_chain(reward_settings, ppo_settings, parent_version=parent_id)
    if kind == "dpo":
        settings = {k: v for k, v in settings.items() if k not in ("total_episodes", "response_length", "kl_coef",
                                                                   "reward_model")}  # fmt: skip
    elif kind == "reward":
        settings = {k: v for k, v in settings.items() if k in reward_keys}
    else:
        settings = {k: v for k, v in settings.items() if k != "beta"}
    return services.runner.submit(kind, settings, parent_version=parent_id)


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
    return (
        f"<div id='run-progress'><b>Run #{status.id} ({html.escape(status.method)}): {html.escape(status.status)}"
        f"</b> · step {step}/{total}{eta_text}"
        f"<div style='background:#ddd;height:12px;border-radius:6px'><div style='width:{done:.0f}%;height:12px;"
        f"background:#4a8;border-radius:6px'></div></div></div>"
    )


def _series(events: list[dict], keys: tuple[str, ...]) -> pd.DataFrame | None:
    rows = [
        {"step": e.get("step", 0), "metric": key, "value": float(e[key])}
        for e in events
        if e.get("event") in ("progress", "eval")
        for key in keys
        if isinstance(e.get(key), int | float)
    ]
    return pd.DataFrame(rows) if rows else None


def _before_after(metrics: dict | None) -> pd.DataFrame | None:
    samples = (metrics or {}).get("before_after", {}).get("samples") if metrics else None
    if not samples:
        return None
    return pd.DataFrame(samples)

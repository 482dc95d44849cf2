"""A finished run's model version: a policy adapter or a reward model, registered once per run."""

from __future__ import annotations

import json
from pathlib import Path

from storage.promotions import same_base
from storage.scores import load_score_file, save_scores
from training.run_folder import optimizer_steps, read_json


class RunRejected(ValueError):
    """A run that must not start; the message is shown to the user as is."""


def resolve_reward_model(store, settings: dict, base_model: str) -> dict:
    """PPO's settings with the reward model resolved: `reward_model_version` (a reward version's id: what the Train
    tab and a reward → PPO chain send) gives `reward_model` its folder; a folder alone (`reward_model`, the path form
    a script passes) is looked up among the reward versions, so the run records which one it used. RunRejected when
    there is none, the id is no reward model, or it was trained on another base model than the app's `base_model`
    (the policy's: a parent version of another base model is refused before this)."""
    settings = dict(settings)
    wanted, folder = settings.get("reward_model_version"), settings.get("reward_model")
    if wanted in (None, "") and folder:
        same = [v for v in store.list_versions("reward") if _same_folder(v["adapter_path"], folder)]
        wanted = same[-1]["id"] if same else None
    if wanted in (None, ""):
        if not folder:
            raise RunRejected("no reward model: train one first (method 'reward', or the reward → PPO chain)")
        settings.pop("reward_model_version", None)
        return settings  # a folder no version holds: the child checks it (a classifier with the base's vocabulary)
    try:
        version = store.get_version(int(wanted))
    except (TypeError, ValueError):
        version = None
    if version is None or version.get("kind") != "reward":
        raise RunRejected(f"reward model {wanted!r} does not exist (pick one of the reward models)")
    if not same_base(version.get("base_model"), base_model):
        raise RunRejected(
            f"reward model {version['id']} was trained on {version.get('base_model')}, not on this app's base model "
            f"{base_model}: it cannot score this model's answers; train a reward model on {base_model}"
        )
    if folder and not _same_folder(version["adapter_path"], folder):
        raise RunRejected(f"reward_model {folder} is not the folder of reward model {version['id']}")
    settings.update(reward_model=version["adapter_path"], reward_model_version=int(version["id"]))
    return settings


def _same_folder(a: str | None, b: str) -> bool:
    return bool(a) and (a == b or Path(a).resolve() == Path(b).resolve())


def reward_outcome(store, version: int, row: dict, metrics: dict) -> tuple[str | None, dict | None]:
    """(note for the run, chained run to submit or None) of a succeeded reward run, registered as `version`.

    Its scores of the stored answers are saved (a bad score file is a note, not a failed run: the reward model is
    registered and fine). A run cancelled while it scored (`cancelled_after_saving`: the model was saved before)
    succeeded with a note, but its chained PPO run is not started: the user asked to stop."""
    note = metrics.get("note")
    scores = Path(row["run_dir"]) / "scores.jsonl"
    if scores.is_file():
        try:
            save_scores(store, version, load_score_file(scores))
        except Exception as exc:
            note = f"the reward model is ready, but its scores of the stored answers were not saved: {exc!r}"
    chain = json.loads(row["config"] or "{}").get("chain")
    if not chain:
        return note, None
    if metrics.get("cancelled_after_saving"):
        return f"{note}; the chained PPO run was not started (the run was cancelled)", None
    return note, {**chain, "settings": {**chain["settings"], "reward_model_version": version}}


def register_version(store, base_model: str, row: dict, metrics: dict) -> int:
    """The run's version, registered once: recording a run again (its end could not be written the first time)
    finds the version it registered then. Its base model is the one the run trained on (its config), not the app's
    `base_model` now: a run recorded after a restart with another --model must not be taken for that model's."""
    with store.read() as cur:
        known = cur.execute("SELECT min(id) FROM model_versions WHERE run_id = ?", [row["id"]]).fetchone()[0]
    if known is not None:
        return int(known)
    run_dir, config = Path(row["run_dir"]), json.loads(row["config"] or "{}").get("config", {})
    base_model = config.get("base_model") or base_model
    trained_on = read_json(run_dir / "trained_on.json") or []
    common = {"base_model": base_model, "parent_id": row["parent_version"], "run_id": row["id"], "metrics": metrics,
              "trained_on": trained_on}  # fmt: skip
    if row["method"] == "reward":
        folder, notes = "reward_model", f"reward model from run {row['id']}"
        return store.add_version(kind="reward", adapter_path=str(run_dir / folder), notes=notes, **common)
    reward_model = config.get("reward_model_version")  # PPO's
    return store.add_version(
        kind="policy",
        adapter_path=str(run_dir / "adapter"),
        reward_model_id=reward_model,
        notes=f"{row['method']} run {row['id']}",
        **common,
    )


def run_outcome(end: dict | None, returncode: int | None, metrics: dict) -> tuple[str, str | None]:
    """(status, reason when failed) of an ended run from its end line and exit code. A run that reports success
    without one optimizer step is failed: it trained nothing, and registering it would offer the untrained adapter
    as a candidate version."""
    status = (end or {}).get("status") or "failed"
    if status == "succeeded" and returncode not in (0, None):
        status = "failed"
    if status == "succeeded" and not optimizer_steps(metrics):
        return "failed", "the run took no optimizer step: nothing was trained, so no version was registered"
    if status == "failed":
        return status, (end or {}).get("error") or f"the training process exited with code {returncode}"
    return status, None

"""A finished run's model version: a policy adapter or a reward model, registered once per run."""

from __future__ import annotations

import json
from pathlib import Path

from training.run_folder import optimizer_steps, read_json


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

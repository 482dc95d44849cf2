"""The job runner in the app process: one training child at a time, the rest wait in a queue.

The app never imports torch training code. A run is: a row in `training_runs`, a run folder holding a data
snapshot (the live DuckDB file is locked by the app) and a `run.yaml` (the submitted settings; the child rewrites it
with every resolved field), and a child process `python -m training METHOD --config run.yaml` whose progress we read
from `progress.jsonl`.
A background thread (`start()`) advances the queue; `tick()` does one step of it (tests call it directly).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from storage.exporters import export_rows, ppo_prompt_rows
from storage.promotions import same_base
from storage.scores import write_generations_to_score
from storage.tallies import usable_pairs
from training.children import Children
from training.datamix import EXPORT_FORMATS, ROW_KINDS, resolve_method
from training.files import write_jsonl
from training.registry import RunRejected, register_version, resolve_reward_model, reward_outcome, run_outcome
from training.run_folder import end_event, log_tail, read_json, read_progress
from training.settings_check import check_settings

LOG_HEADER = "--- last lines of the log ---"
METHODS = ("dpo", "reward", "ppo", "kto", "sft", "sft_dpo", "auto")  # auto: training/datamix.py picks one
CANCEL_KEY = "cancel_run:"  # app_settings key + run id: cancel a run another app process watches
MIN_PAIRS = 4  # below this a preference run learns nothing but noise
# On PostgreSQL a queued run without its folder may be one another app process is still writing: after this long
# it was left half-submitted (that app stopped, its disk filled up). On DuckDB only this process submits.
PREPARING = "created_at < now() - INTERVAL '10 minutes'"


@dataclass
class RunStatus:
    id: int
    method: str
    status: str
    run_dir: str
    config: dict
    metrics: dict
    error: str | None
    result_version: int | None
    parent_version: int | None
    snapshot_rows: int
    progress: list[dict] = field(default_factory=list)
    log_tail: str = ""
    message: str = ""  # why Auto chose this method

    @property
    def last(self) -> dict:
        steps = [p for p in self.progress if p.get("event") == "progress"]
        return steps[-1] if steps else {}


class JobRunner:
    def __init__(
        self,
        store,
        runs_dir: str | Path = "data/runs",
        base_model: str = "bundled",
        model_cache: str | Path = "data/models",
        poll_seconds: float = 1.0,
    ):
        self.store = store
        self.runs_dir = Path(runs_dir)
        self.base_model = base_model
        self.model_cache = str(model_cache)
        self.poll_seconds = poll_seconds
        self._children = Children()  # started by this runner, or adopted after a restart (training/children.py)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner = False  # this process runs the queue (always on DuckDB; one app process of several on PostgreSQL)
        self._cancelled: set[int] = set()  # runs sent SIGTERM on a Cancel: one that dies before its handler is set
        # up (in its first second) writes no end line, and is still recorded as cancelled, not failed
        self._take_queue()

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def stop(self, cancel_running: bool = False) -> None:
        """Stop the queue; `cancel_running` (app shutdown): SIGTERM each child, then SIGKILL its process group."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if cancel_running:
            with self._lock:
                self._children.stop_all()
                self.tick()  # records how their runs ended; nothing new starts once stopping

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception as exc:  # the loop must outlive one bad tick; the error is logged
                print(f"job runner: {exc!r}", file=sys.stderr)

    def _take_queue(self) -> bool:
        """Whether this process runs the queue: several app processes on one PostgreSQL store share the runs, and
        only the holder of the store's "runner" lock starts, watches and records children (one run at a time for
        the whole store). It takes over, adopting or recording what was running, when the holder's process ends."""
        owner = self.store.hold_lock("runner")
        if owner and not self._owner:
            self._owner = True
            self.recover()
        self._owner = owner
        return owner

    def recover(self) -> None:
        """After a restart: adopt a child still running (watch it, Cancel reaches it), else record how it ended."""
        for row in self._rows("status = 'running'"):
            if not self._children.adopt(row["id"], row["pid"], row["run_dir"]):
                self._end(row["id"])

    def _end(self, run_id: int, returncode: int | None = None, watched: bool = False) -> None:
        """Record how a run ended (its end line); a failure while recording still ends it, as failed. `watched`: the
        child ended while this runner watched it (its exit code is None when it was adopted after a restart)."""
        row = self._rows("id = ?", [run_id])[0]
        end = end_event(row["run_dir"])
        try:
            if end is None and run_id in self._cancelled:  # killed by the Cancel before its handler was set up
                self._set(run_id, status="cancelled", error="cancelled as it started", end=True)
            elif end is None and returncode is None and watched:  # adopted after a restart: no exit code
                error = "the training process ended without reporting how (adopted after an app restart)"
                error += f"\n{LOG_HEADER}\n{log_tail(row['run_dir'])}"
                self._set(run_id, status="failed", error=error, end=True)
            elif end is None and returncode is None:  # not our child: no exit code, no end line
                self._set(run_id, status="failed", error="the app stopped while this run was running", end=True)
            else:
                self._finish(row, end, returncode)
        except Exception as exc:
            self._set(run_id, status="failed", error=f"the run ended, but recording it failed: {exc!r}", end=True)

    # ---- submitting ------------------------------------------------------------------------------------
    def usable_pairs(self) -> int:
        """The rows a DPO export would hold, from kept counts (the Train tab asks every 5 s)."""
        return usable_pairs(self.store)

    def submit(self, method: str, settings: dict | None = None, parent_version: int = 0, chain: dict | None = None):
        """Validate, snapshot the data into a new run folder and queue the run. Returns the run id."""
        settings = dict(settings or {})
        if method not in METHODS:
            raise RunRejected(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        method, reason = resolve_method(self.store, method)  # 'auto' becomes dpo, kto or sft_dpo, with the reason
        parent = self.store.get_version(parent_version)
        if parent is None or parent.get("kind", "policy") != "policy":
            raise RunRejected(f"model version {parent_version} does not exist")
        if parent_version != 0 and not same_base(parent.get("base_model"), self.base_model):
            raise RunRejected(
                f"version {parent_version} was trained on {parent.get('base_model')}, not on this app's base model "
                f"{self.base_model}: its adapter does not fit"
            )
        if method == "ppo":  # a reward version's id → its folder; one of another base model is refused
            settings = resolve_reward_model(self.store, settings, self.base_model)
        self.check(method, settings, parent_version)
        if chain:
            self.check(chain["method"], chain["settings"], chain["parent_version"], reward_model_later=True)
        rows, comparison_ids = self._snapshot_rows(method)
        if method != "ppo" and len(rows) < MIN_PAIRS:
            raise RunRejected(
                f"only {len(rows)} usable {ROW_KINDS[method]}; label at least {MIN_PAIRS} before training"
            )
        with self._lock:  # the queue never sees the row before its folder is written
            run_id = self._insert_run(method, parent_version, len(rows))
            try:
                self._write_run(run_id, method, settings, parent, parent_version, rows, comparison_ids, chain, reason)
            except Exception as exc:  # a full disk, a bad folder: the row ends failed, the queue moves on
                self._set(run_id, status="failed", error=f"its run folder could not be written: {exc}", end=True)
                raise RunRejected(f"run {run_id} could not be prepared: {exc}") from exc
        self.tick()
        return run_id

    def _write_run(
        self, run_id, method, settings, parent, parent_version, rows, comparison_ids, chain, reason
    ) -> None:
        run_dir = self.runs_dir / f"run-{run_id:04d}-{method}"
        for again in range(2, 1000):  # a folder left by an earlier database with the same run ids is never reused:
            if not run_dir.exists():  # its progress and end line would be taken for this run's
                break
            run_dir = self.runs_dir / f"run-{run_id:04d}-{method}-{again}"
        run_dir.mkdir(parents=True)
        data_path = run_dir / "data.jsonl"
        write_jsonl(data_path, rows)
        config = {**settings, **self._run_fields(parent_version), "data": str(data_path), "out": str(run_dir)}
        if method == "ppo":
            config["prompts"] = str(data_path)
        scored = run_dir / "generations.jsonl"  # the new reward model also scores the newest generations (Data tab)
        if method == "reward" and write_generations_to_score(self.store, -1, scored):
            config["score_data"] = str(scored)
        (run_dir / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
        (run_dir / "trained_on.json").write_text(json.dumps(comparison_ids), encoding="utf-8")
        meta = {"config": config, "chain": chain, "trained_on": len(comparison_ids), "reason": reason}
        self._set(run_id, run_dir=str(run_dir), config=json.dumps(meta))

    def check(self, method: str, settings: dict, parent_version: int, reward_model_later: bool = False) -> None:
        """RunRejected unless the child would accept these settings (training/settings_check.py)."""
        try:
            check_settings(method, settings, self._run_fields(parent_version), reward_model_later)
        except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
            raise RunRejected(f"{method}: {exc}") from None

    def _run_fields(self, parent_version: int) -> dict:
        """What every run's config gets besides its settings: the base model, its cache, the parent version."""
        fields = {"base_model": self.base_model, "model_cache": self.model_cache, "base_version": parent_version}
        parent = self.store.get_version(parent_version) or {}
        if parent.get("adapter_path"):
            fields["init_adapter"] = parent["adapter_path"]
        return fields

    def submit_chain(self, reward_settings: dict, ppo_settings: dict, parent_version: int = 0) -> int:
        """Reward model first, then PPO against it, as one job chain (the PPO run is queued when the first ends)."""
        chain = {"method": "ppo", "settings": ppo_settings, "parent_version": parent_version}
        return self.submit("reward", reward_settings, parent_version=parent_version, chain=chain)

    def _snapshot_rows(self, method: str) -> tuple[list[dict], list[int]]:
        if method == "ppo":
            return ppo_prompt_rows(self.store), []
        rows = export_rows(self.store, EXPORT_FORMATS[method], with_ids=True)
        ids = sorted({int(r.pop("comparison_id")) for r in rows})
        return rows, ids

    # ---- the queue -------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Reap ended children (ours, or adopted after a restart), then start the oldest queued run if nothing is
        running. A 'running' row nobody watches is checked too, so none stays 'running' forever."""
        with self._lock:
            if not self._take_queue():
                return  # another app process runs the queue: it starts what we queued
            for run_id in self._cancel_requests():
                self._cancelled.add(run_id)
                self._children.terminate(run_id)
            for run_id, returncode in self._children.ended():
                self._end(run_id, returncode, watched=True)
            for row in self._rows("status = 'running'"):  # e.g. recording its end failed before: try again
                if row["id"] not in self._children and not self._children.adopt(row["id"], row["pid"], row["run_dir"]):
                    self._end(row["id"])
            if self._children or self._stop.is_set():
                return
            ready = f"(run_dir IS NOT NULL OR {PREPARING})" if self.store.dialect == "postgres" else "TRUE"
            for row in self._rows(f"status = 'queued' AND {ready} ORDER BY id"):
                if self._launch(row):
                    return

    def _launch(self, row: dict) -> bool:
        """Start a queued run's child (True), or end the run failed with the reason (the queue moves on)."""
        run_dir = Path(row["run_dir"] or "")
        if not row["run_dir"] or not (run_dir / "run.yaml").is_file():
            error = "its run folder was never completed (the app stopped or the disk filled up during submit)"
            self._set(row["id"], status="failed", error=error, end=True)
            return False
        if not self._set(row["id"], status="running", start=True, only_from="queued"):
            return False  # cancelled meanwhile (on PostgreSQL, by another app process): never started
        cmd = [sys.executable, "-m", "training", row["method"], "--config", str(run_dir / "run.yaml")]
        quiet = {"PYTHONUNBUFFERED": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **quiet}  # see training/__main__.py: no spinning threads
        try:
            pid = self._children.start(row["id"], cmd, run_dir, env)
        except OSError as exc:
            self._set(row["id"], status="failed", error=f"the training process could not start: {exc}", end=True)
            return False
        self._set(row["id"], pid=pid)
        return True

    def _finish(self, row: dict, end: dict | None, returncode: int | None = None) -> None:
        metrics = (end or {}).get("metrics") or read_json(Path(row["run_dir"]) / "metrics.json") or {}
        status, reason = run_outcome(end, returncode, metrics)  # a run without an optimizer step is failed
        error = f"{reason}\n{LOG_HEADER}\n{log_tail(row['run_dir'])}" if status == "failed" else None
        version = register_version(self.store, self.base_model, row, metrics) if status == "succeeded" else None
        chain = None  # a reward run: scores saved, a note (e.g. cancelled while scoring), its chained PPO run
        if version is not None and row["method"] == "reward":
            note, chain = reward_outcome(self.store, version, row, metrics)
            error = error or note
        self._set(row["id"], status=status, metrics=json.dumps(metrics), error=error, result_version=version, end=True)
        if chain:
            try:
                self.submit(chain["method"], chain["settings"], parent_version=chain["parent_version"])
            except Exception as exc:  # the reward run itself succeeded and is recorded so: say why PPO did not start
                self._set(row["id"], error=f"the chained PPO run could not start: {exc}")

    # ---- control and views -----------------------------------------------------------------------------
    def cancel(self, run_id: int) -> str:
        """Queued runs are cancelled at once; a running child gets SIGTERM and stops at its next step."""
        with self._lock:
            rows = self._rows("id = ?", [run_id])
            if not rows:
                raise RunRejected(f"there is no run {run_id}")
            row = rows[0]
            if row["status"] == "queued":
                if self._set(run_id, status="cancelled", end=True, only_from="queued"):
                    return "cancelled before it started"
                row = self._rows("id = ?", [run_id])[0]  # another app process started it meanwhile
            if row["status"] != "running":
                return f"run {run_id} is already {row['status']}"
            if not self._owner:  # another app process watches the child: it stops it at its next tick
                self.store.set_setting(f"{CANCEL_KEY}{run_id}", "requested")
                return "stopping at the next step"
            self._cancelled.add(run_id)
            self._children.terminate(run_id)  # adopted children only while their pid and start time still match
            return "stopping at the next step"

    def status(self, run_id: int) -> RunStatus | None:
        rows = self._rows("id = ?", [run_id])
        if not rows:
            return None
        row = rows[0]
        return RunStatus(
            id=row["id"],
            method=row["method"],
            status=row["status"],
            run_dir=row["run_dir"] or "",
            config=json.loads(row["config"] or "{}").get("config", {}),
            metrics=json.loads(row["metrics"] or "{}"),
            error=row["error"],
            result_version=row["result_version"],
            parent_version=row["parent_version"],
            snapshot_rows=row["snapshot_rows"] or 0,
            progress=read_progress(row["run_dir"] or "."),
            log_tail=log_tail(row["run_dir"] or "."),
            message=json.loads(row["config"] or "{}").get("reason") or "",
        )

    def runs(self, limit: int = 20) -> list[dict]:
        return self._rows(f"TRUE ORDER BY id DESC LIMIT {int(limit)}")

    def wait(self, run_id: int, timeout: float = 900) -> RunStatus:
        """Block until a run has ended (for the CLI, tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            status = self.status(run_id)
            if status and status.status in ("succeeded", "failed", "cancelled"):
                return status
            time.sleep(0.2)
        raise TimeoutError(f"run {run_id} did not end within {timeout} s")

    def _cancel_requests(self) -> list[int]:
        """Runs another app process was asked to cancel (app_settings rows, each taken once; PostgreSQL only)."""
        if self.store.dialect == "duckdb":
            return []  # one app process: cancel() stops the child itself
        like = [CANCEL_KEY + "%"]
        with self.store.read() as cur:
            if not cur.execute("SELECT key FROM app_settings WHERE key LIKE ?", like).fetchall():
                return []
        with self.store.transaction() as cur:
            keys = [r[0] for r in cur.execute("SELECT key FROM app_settings WHERE key LIKE ?", like).fetchall()]
            cur.execute("DELETE FROM app_settings WHERE key = ANY(?)", [keys])
        return [int(key[len(CANCEL_KEY) :]) for key in keys]

    # ---- rows ------------------------------------------------------------------------------------------
    def _rows(self, where: str, params: list | None = None) -> list[dict]:
        with self.store.read() as cur:
            cur.execute(f"SELECT * FROM training_runs WHERE {where}", params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def _insert_run(self, method: str, parent_version: int, snapshot_rows: int) -> int:
        with self.store.transaction() as cur:
            cur.execute(
                "INSERT INTO training_runs (id, method, status, parent_version, snapshot_rows, created_at) "
                "VALUES (nextval('training_runs_id_seq'), ?, 'queued', ?, ?, now()) RETURNING id",
                [method, parent_version, snapshot_rows],
            )
            return int(cur.fetchone()[0])

    def _set(self, run_id: int, *, start: bool = False, end: bool = False, only_from: str | None = None, **columns):
        """Update the run's row; with `only_from`, only while its status is that one. Whether a row changed."""
        sets = [f"{name} = ?" for name in columns]
        sets += ["started_at = now()"] if start else []
        sets += ["finished_at = now()", "pid = NULL"] if end else []
        where, params = "id = ?", [*columns.values(), run_id]
        if only_from is not None:
            where, params = where + " AND status = ?", [*params, only_from]
        with self.store.transaction() as cur:
            sql = f"UPDATE training_runs SET {', '.join(sets)} WHERE {where} RETURNING id"
            return bool(cur.execute(sql, params).fetchall())

"""Backups wired into the app: restore a lost database at start, flush every few minutes and once more at shutdown.

storage/backup.py writes and restores the parquet shards, storage/backup_hub.py mirrors the folder with a Hugging
Face dataset repo (only when HF_TOKEN is set). The start-up order matters and is kept here:

1. pull the Hub repo (shards and `adapters/<run folder>/`) into the backup folder;
2. restore into a database file that did not exist, before seed prompts, the pair queue or the runner touch it
   (seed prompts go in only when the store has no prompts, so a restored store gets none);
3. relink restored model versions whose adapter folder is gone to the pulled copy, placed where the runner puts
   adapters (`<runs dir>/<run folder>/adapter`), so served versions come back;
4. start the scheduler; the app's one shutdown path calls `BackupSetup.stop` for the last flush (and push).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from storage.backup import BackupScheduler, restore
from storage.backup_hub import HubSync, HubSyncError

ADAPTERS = "adapters"  # <backup folder>/adapters/<run folder>/ and the same path in the Hub repo
RESTORE_PENDING = "backup:restore_pending"  # app_settings: "1" from a new database's start until its restore is done
SHUTDOWN_PUSH_SECONDS = 60  # the last push may take this long: a platform stopping the app kills it soon after


class BackupStartError(RuntimeError):
    """Backups cannot start safely (the message says why and what to do); the app exits with it."""


@dataclass
class BackupSetup:
    scheduler: BackupScheduler
    hub: HubSync | None
    restored: dict[str, int] = field(default_factory=dict)  # rows restored per table (empty: the database existed)
    relinked: list[int] = field(default_factory=list)  # model versions whose adapter path now points at a copy

    def stop(self) -> dict | None:
        """The shutdown step: stop the thread, flush (and push) a last time, say what was written. The flush comes
        first and is local, so a push cut short still leaves every row in the backup folder."""
        if self.hub is not None:
            self.hub.deadline_s = min(self.hub.deadline_s, SHUTDOWN_PUSH_SECONDS)
        result = self.scheduler.stop(flush=True)
        if result is None:
            print(f"prefloop: the last backup failed: {self.scheduler.last_error}", file=sys.stderr, flush=True)
        else:
            rows = sum(result["rows"].values())
            print(f"prefloop: backup flushed ({rows} rows) to {self.scheduler.backup.folder}", flush=True)
        return result


def start_backups(
    store,
    folder: str | Path,
    *,
    new_db: bool,
    runs_dir: str | Path,
    every_s: float = 300,
    hub_repo: str | None = None,
    log: Callable[[str], None] = print,
) -> BackupSetup:
    """Pull, restore (into a new database only), relink adapters, start the scheduler. BackupStartError when a new
    database cannot get the Hub copy: starting empty would later push an empty backup over the real one."""
    folder, runs_dir = Path(folder), Path(runs_dir)
    # A new database stays "new" until its restore is done: a first start that failed (the pull, or killed) left a
    # migrated file behind, and the next start must restore into it, not serve it empty and back that up.
    new_db = new_db or store.get_setting(RESTORE_PENDING) == "1"
    if new_db:
        store.set_setting(RESTORE_PENDING, "1")
    hub = HubSync.from_env(hub_repo, folder)
    if hub_repo and hub is None:
        log(f"prefloop: warning: --backup-hub-repo {hub_repo} needs HF_TOKEN; backing up to {folder} only")
    if hub is not None:
        try:
            pulled = hub.pull(prefixes=[ADAPTERS])
        except HubSyncError as exc:
            if new_db:
                raise BackupStartError(
                    f"{exc}. The database is new, so starting without the Hub copy could overwrite it: fix HF_TOKEN "
                    "or the network and start again (or start without --backup-hub-repo)"
                ) from exc
            log(f"prefloop: warning: {exc}; the local database is kept and pushed as usual")
        else:
            if new_db and not pulled["exists"]:
                _claim(hub, hub_repo)
            log(
                f"prefloop: pulled {pulled['shards']} backup shards from {hub_repo}"
                if pulled["exists"]
                else f"prefloop: the Hub repo {hub_repo} did not exist: created it, empty"
            )
    restored = restore(store, folder) if new_db else {}
    if new_db:
        store.set_setting(RESTORE_PENDING, "0")
    if any(restored.values()):
        log(f"prefloop: restored {sum(restored.values())} rows from {folder}: {restored}")
    relinked = relink_adapters(store, folder, runs_dir)
    if relinked:
        log(f"prefloop: adapters of versions {relinked} restored from the backup into {runs_dir}")
    scheduler = BackupScheduler(store, folder, every_s, hub=hub, extra=lambda: run_adapters(runs_dir))
    return BackupSetup(scheduler, hub, restored, relinked)


def _claim(hub: HubSync, repo: str) -> None:
    """A new database and a repo the Hub says is not there: create it now. The Hub says the same of a private repo
    this token may not read; starting empty then would lose every vote at the next restart (its pushes fail)."""
    try:
        hub.create()
    except HubSyncError as exc:
        raise BackupStartError(
            f"the Hub repo {repo} cannot be read or created with this HF_TOKEN ({exc}). If it exists, give the token "
            "read and write access to it; the database is new, so the app does not start without its backup"
        ) from exc


def run_adapters(runs_dir: str | Path) -> dict[str, Path]:
    """{"adapters/<run folder>": adapter folder} of every finished policy run: uploaded with each Hub push."""
    return {f"{ADAPTERS}/{p.parent.name}": p for p in sorted(Path(runs_dir).glob("*/adapter")) if p.is_dir()}


def relink_adapters(store, folder: str | Path, runs_dir: str | Path) -> list[int]:
    """Model versions whose adapter folder is missing but whose copy is in `<folder>/adapters/<run folder>`: copy it
    to `<runs_dir>/<run folder>/<leaf>` (unless there already) and point the version (and its run) there.
    Returns the version ids changed. Versions without a copy keep their path (activating them says it is gone)."""
    folder, runs_dir = Path(folder), Path(runs_dir)
    with store.read() as cur:
        rows = cur.execute(
            "SELECT id, adapter_path, run_id FROM model_versions WHERE adapter_path IS NOT NULL"
        ).fetchall()
    changed = []
    for version_id, adapter_path, run_id in rows:
        old = Path(adapter_path)
        source = folder / ADAPTERS / old.parent.name
        if old.is_dir() or not (source / "adapter_config.json").is_file():
            continue
        target = runs_dir / old.parent.name / old.name
        if not target.is_dir():
            temp = target.with_name(f".{target.name}.restoring")
            shutil.rmtree(temp, ignore_errors=True)
            shutil.copytree(source, temp)
            temp.rename(target)  # a crash mid-copy never leaves a half adapter at the real path
        with store.transaction() as cur:
            cur.execute("UPDATE model_versions SET adapter_path = ? WHERE id = ?", [str(target), version_id])
            if run_id is not None:
                cur.execute(
                    "UPDATE training_runs SET run_dir = ? WHERE id = ? AND run_dir = ?",
                    [str(target.parent), run_id, str(old.parent)],
                )
        changed.append(int(version_id))
    return changed

"""Mirror a backup folder (storage/backup.py) with a Hugging Face dataset repo, through huggingface_hub.

The network may be down or slow: each call first asks the Hub for the repo with a short timeout (an unreachable Hub
fails in seconds, with one HubSyncError saying what and where), and the whole call runs on a daemon thread waited
for at most `deadline_s`, so neither startup nor the shutdown flush can hang on it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from storage.backup import MANIFEST, TABLES, list_shards, load_state

SHARD_PATTERNS = [f"{table}/*.parquet" for table in TABLES]  # what a push uploads (with the manifest) and a pull gets


class HubSyncError(RuntimeError):
    """A Hub pull or push that failed or did not finish in time (the message says which and why)."""


class HubSync:
    """A backup folder and a dataset repo: pull() at start (before restore), push() after flushes."""

    def __init__(
        self,
        repo_id: str,
        folder: str | Path,
        token: str | None,
        *,
        endpoint: str | None = None,
        private: bool = True,
        timeout_s: float = 15,
        deadline_s: float = 900,
    ):
        from huggingface_hub import HfApi, constants

        self.repo_id, self.folder, self.token, self.private = repo_id, Path(folder), token, private
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.timeout_s, self.deadline_s = timeout_s, deadline_s
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self._busy: threading.Thread | None = None

    @classmethod
    def from_env(cls, repo_id: str | None, folder: str | Path, **options) -> HubSync | None:
        """A HubSync when a repo is named and HF_TOKEN is set, else None."""
        token = os.environ.get("HF_TOKEN")
        return cls(repo_id, folder, token, **options) if repo_id and token else None

    def pull(self, prefixes: Iterable[str] = ()) -> dict:
        """Download the repo's shards (and files under `prefixes`, e.g. "adapters") into the folder. The manifest
        is not pulled: the local one (or the shards) decide. {"exists": False} when the repo is not there yet."""
        from huggingface_hub import snapshot_download

        if not self._exists("pull"):
            return {"repo": self.repo_id, "exists": False, "shards": 0}
        patterns = [*SHARD_PATTERNS, *(f"{prefix.strip('/')}/**" for prefix in prefixes)]
        self._bounded(
            "pull",
            snapshot_download,
            self.repo_id,
            repo_type="dataset",
            local_dir=self.folder,
            token=self.token,
            endpoint=self.endpoint,
            allow_patterns=patterns,
            etag_timeout=self.timeout_s,
        )
        shards = sum(len(list_shards(self.folder, table)) for table in TABLES)
        return {"repo": self.repo_id, "exists": True, "shards": shards}

    def create(self) -> None:
        """Create the repo, refusing one that exists (HubSyncError): the Hub answers "not found" also for a private
        repo this token may not read, so a new database claims the repo before it starts empty."""
        self._bounded("create", self.api.create_repo, self.repo_id, repo_type="dataset", private=self.private)

    def push(self, extra: Mapping[str, str | Path] | None = None) -> dict:
        """Upload the folder's shards and manifest (creating the repo when missing; deleting there the snapshots
        pruned here), then each extra local folder under its path in the repo. Returns the commit urls."""
        if not self._exists("push"):
            self._bounded(
                "push", self.api.create_repo, self.repo_id, repo_type="dataset", private=self.private, exist_ok=True
            )
        pruned = load_state(self.folder).get("pruned") or None
        commits = [self._upload(self.folder, "", allow_patterns=[MANIFEST, *SHARD_PATTERNS], delete_patterns=pruned)]
        for prefix, local in (extra or {}).items():
            if Path(local).is_dir():
                commits.append(self._upload(Path(local), prefix.strip("/")))
        return {"repo": self.repo_id, "commits": commits}

    def _upload(self, folder: Path, path_in_repo: str, **patterns) -> str | None:
        """One upload_folder commit (none when nothing changed); its url."""
        info = self._bounded(
            "push",
            self.api.upload_folder,
            repo_id=self.repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            repo_type="dataset",
            commit_message="prefloop backup",
            **patterns,
        )
        return getattr(info, "commit_url", None)

    def _exists(self, what: str) -> bool:
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            self._bounded(what, self.api.repo_info, self.repo_id, repo_type="dataset", timeout=self.timeout_s)
        except HubSyncError as exc:
            if isinstance(exc.__cause__, RepositoryNotFoundError):
                return False
            raise
        return True

    def _bounded(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """fn(...) on a daemon thread, waited for at most deadline_s; any failure becomes one HubSyncError."""
        if self._busy is not None and self._busy.is_alive():
            raise HubSyncError(f"Hub {what} of {self.repo_id}: an earlier call that timed out is still running")
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                box["error"] = exc

        self._busy = threading.Thread(target=run, name=f"hub-{what}", daemon=True)
        self._busy.start()
        started = time.monotonic()
        while self._busy.is_alive() and time.monotonic() - started < self.deadline_s:  # re-read: the shutdown
            self._busy.join(0.2)  # lowers deadline_s, and a call already waiting must give up by then too
        if self._busy.is_alive():
            raise HubSyncError(f"Hub {what} of {self.repo_id} at {self.endpoint}: no end within {self.deadline_s:g} s")
        if "error" in box:
            exc = box["error"]
            hint = " (HF_HUB_OFFLINE is set)" if type(exc).__name__ == "OfflineModeIsEnabled" else ""
            raise HubSyncError(
                f"Hub {what} of {self.repo_id} at {self.endpoint} failed{hint}: {type(exc).__name__}: {exc}"
            ) from exc
        return box.get("result")

"""storage/backup_hub.py up to the network boundary: a local stand-in Hub, a closed port, a silent port."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from storage.backup import Backup, restore
from storage.backup_hub import HubSync, HubSyncError
from storage.db import Store
from tests.test_backup import dump, fill, lose_disk


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db" / "prefloop.duckdb")
    yield s
    s.close()


class Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in Hub that records each request. With `server.repo` (a folder) it serves that folder as the dataset
    repo (info, tree, files); without, the repo does not exist and creating it is refused."""

    def answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?")[0]
        self.server.seen.append((self.command, path, self.headers.get("authorization"), body))
        repo, sha = self.server.repo, "c" * 40
        files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) if repo else []
        if repo is None and path.startswith("/api/repos/create"):
            self.reply(403, {"error": "You don't have the rights to create a dataset here"})
        elif repo is None:
            self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        elif path.startswith("/api/datasets/") and "/tree/" in path:
            self.reply(200, [{"type": "file", "path": f, "size": (repo / f).stat().st_size, "oid": _sha(repo / f)}
                             for f in files])  # fmt: skip
        elif path.startswith("/api/datasets/"):
            self.reply(200, {"id": "someone/data", "sha": sha, "siblings": [{"rfilename": f} for f in files]})
        else:  # /datasets/<repo>/resolve/<sha>/<file>
            data = (repo / path.split("/resolve/")[1].split("/", 1)[1]).read_bytes()
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            self.reply(200, data, headers, send=self.command == "GET")

    def reply(self, status: int, payload, headers: dict | None = None, send: bool = True) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {
            "Content-Type": "application/json",
            **(headers or {}),
            "Content-Length": len(data),
        }.items():
            self.send_header(name, str(value))
        self.end_headers()
        if send:
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def online(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1 (conftest); these talk to local endpoints only."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.seen, server.repo = [], None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_pull_and_push_use_the_hub_api_and_fail_clearly(online, hub_server, tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{hub_server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    sync = HubSync("someone/prefloop-backup", tmp_path / "backup", "hf_secret", timeout_s=5)
    assert sync.endpoint == url
    assert sync.pull() == {"repo": "someone/prefloop-backup", "exists": False, "shards": 0}
    with pytest.raises(HubSyncError, match=r"push of someone/prefloop-backup .* failed.*403"):
        sync.push()
    requests = [(method, path) for method, path, _, _ in hub_server.seen]
    info = ("GET", "/api/datasets/someone/prefloop-backup")
    assert requests == [info, info, ("POST", "/api/repos/create"), info]  # create_repo checks the repo after a 403
    assert {auth for _, _, auth, _ in hub_server.seen} == {"Bearer hf_secret"}
    create = json.loads(hub_server.seen[2][3])
    assert create["type"] == "dataset" and create["visibility"] == "private" and create["name"] == "prefloop-backup"


def test_an_unreachable_or_silent_hub_fails_fast(online, tmp_path):
    for endpoint in (f"http://127.0.0.1:{closed_port()}", None):
        with socket.socket() as silent:  # accepts connections (the backlog) and never answers
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            endpoint = endpoint or f"http://127.0.0.1:{silent.getsockname()[1]}"
            sync = HubSync("someone/data", tmp_path, "hf_x", endpoint=endpoint, timeout_s=1, deadline_s=20)
            for call in (sync.pull, sync.push):
                started = time.monotonic()
                with pytest.raises(HubSyncError, match=f"at {endpoint} failed: .*(Connect|Timeout)"):
                    call()
                assert time.monotonic() - started < 10


def test_offline_mode_deadline_and_token(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sync = HubSync("someone/data", tmp_path, "hf_x", endpoint="http://127.0.0.1:9", deadline_s=0.3)
    with pytest.raises(HubSyncError, match="HF_HUB_OFFLINE"):
        sync.pull()
    with pytest.raises(HubSyncError, match="no end within 0.3 s"):
        sync._bounded("push", time.sleep, 1.5)
    with pytest.raises(HubSyncError, match="still running"):
        sync.pull()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert HubSync.from_env("someone/data", tmp_path) is None
    monkeypatch.setenv("HF_TOKEN", "hf_y")
    assert HubSync.from_env("someone/data", tmp_path).token == "hf_y"
    assert HubSync.from_env(None, tmp_path) is None


def test_a_fresh_disk_pulls_the_repo_and_restores_it(online, hub_server, store, tmp_path):
    folder = tmp_path / "backup"
    fill(store, "a")
    Backup(store, folder).flush()
    fill(store, "b")
    Backup(store, folder).flush()
    before, shards = dump(store), len(list(folder.rglob("*.parquet")))
    lose_disk(store)
    hub_server.repo = tmp_path / "repo"  # what earlier pushes left on the Hub: the folder, plus an adapter
    shutil.copytree(folder, hub_server.repo)
    (hub_server.repo / "adapters" / "3").mkdir(parents=True)
    (hub_server.repo / "adapters" / "3" / "adapter_config.json").write_text("{}")
    shutil.rmtree(folder)

    url = f"http://127.0.0.1:{hub_server.server_address[1]}"
    sync = HubSync("someone/data", tmp_path / "pulled", "hf_x", endpoint=url, timeout_s=5, deadline_s=60)
    assert sync.pull(prefixes=["adapters"]) == {"repo": "someone/data", "exists": True, "shards": shards}
    assert not (tmp_path / "pulled" / "manifest.json").exists()  # the shards decide
    assert (tmp_path / "pulled" / "adapters" / "3" / "adapter_config.json").read_text() == "{}"
    again = Store(tmp_path / "new.duckdb")
    restore(again, tmp_path / "pulled")
    assert dump(again) == before
    assert Backup(again, tmp_path / "pulled").flush()["flush"] is None
    again.close()


def test_a_first_start_that_failed_is_still_new_at_the_next(online, store, tmp_path, monkeypatch):
    """A new database whose first start failed (the Hub pull) left its migrated file: the next start saw an existing
    database, skipped the restore and served (and backed up) an empty store over the real backup."""
    from labeling.backups import BackupStartError, start_backups

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    for new_db in (True, False):  # the second start finds the file the first one left
        with pytest.raises(BackupStartError, match="The database is new"):
            start_backups(store, tmp_path / "backup", new_db=new_db, runs_dir=tmp_path / "runs", hub_repo="a/b")


def test_a_call_waiting_on_the_hub_gives_up_when_the_deadline_is_lowered(tmp_path):
    """The shutdown lowers the deadline so its flush is not stuck behind a push already waiting (up to 900 s)."""
    hub = HubSync("someone/data", tmp_path, "hf_test", endpoint="http://127.0.0.1:9", deadline_s=900)
    threading.Timer(0.3, lambda: setattr(hub, "deadline_s", 0.5)).start()
    began = time.monotonic()
    with pytest.raises(HubSyncError, match="no end within"):
        hub._bounded("push", time.sleep, 5)
    assert time.monotonic() - began < 2


def test_a_new_database_refuses_a_repo_it_can_neither_read_nor_create(
    online, hub_server, store, tmp_path, monkeypatch
):
    """The Hub answers "not found" for a private repo the token may not read: a new database used to start empty
    ("the first push creates it") and lose its votes at the next restart, every push failing."""
    from labeling.backups import BackupStartError, start_backups

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub_server.server_address[1]}")
    with pytest.raises(BackupStartError, match="cannot be read or created with this HF_TOKEN"):
        start_backups(store, tmp_path / "backup", new_db=True, runs_dir=tmp_path / "runs", hub_repo="someone/data")
    assert ("POST", "/api/repos/create") in [(m, p) for m, p, _, _ in hub_server.seen]

"""Who a training child is, so the runner signals it and never a stranger that later got the same pid.

A child starts in its own session (`start_new_session=True`): it outlives an app killed with SIGKILL, and its
process group id is its pid. Right after the start the runner records the child's pid, boot id and start time
(/proc/PID/stat field 22, clock ticks since boot) in the run's own folder (RUN_DIR/child.json). A pid is "ours"
only while a process with that pid and that start time exists (a zombie included: its pid cannot be reused yet).
An app that starts again reads child.json to adopt a child that is still running (watch its progress.jsonl,
cancel it) or to leave a reused pid alone. Standard library only (the app imports this; psutil is used for the
start time where there is no /proc, when it is installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the checkout the child's `python -m training` is imported from

CHILD_FILE = "child.json"
STOP_GRACE_SECONDS = 20.0  # at shutdown: SIGTERM, this long to save and write the end line, then SIGKILL the group
REAP_SECONDS = 5.0  # then this long for our own children to be reaped (their exit code tells how the run ended)


def process_identity(pid: int) -> tuple[str, int, bool] | None:
    """(boot id, start time, is a zombie) of the process `pid`, or None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return _psutil_identity(pid)
    fields = stat[stat.rindex(")") + 2 :].split()  # after "(comm)", which may hold spaces: field 3 onwards
    return _boot_id(), int(fields[19]), fields[0] in ("Z", "X")


def _psutil_identity(pid: int) -> tuple[str, int, bool] | None:
    try:
        import psutil

        proc = psutil.Process(pid)
        return "", int(proc.create_time() * 100), proc.status() == psutil.STATUS_ZOMBIE
    except Exception:  # no psutil, or no such process
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class Child:
    pid: int
    boot_id: str
    started: int

    @classmethod
    def of(cls, pid: int) -> Child | None:
        """The process `pid` as it is now (None when it is already gone)."""
        identity = process_identity(pid)
        return None if identity is None else cls(pid, identity[0], identity[1])

    @classmethod
    def load(cls, run_dir: str | Path | None) -> Child | None:
        try:
            data = json.loads((Path(run_dir) / CHILD_FILE).read_text(encoding="utf-8"))
            return cls(int(data["pid"]), str(data["boot_id"]), int(data["started"]))
        except (TypeError, OSError, ValueError, KeyError):
            return None

    def save(self, run_dir: str | Path) -> None:
        path = Path(run_dir) / CHILD_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "boot_id": self.boot_id, "started": self.started}))
        tmp.replace(path)

    def ours(self) -> bool:
        """The pid still belongs to this child (running, or exited but not yet reaped)."""
        identity = process_identity(self.pid)
        return identity is not None and identity[:2] == (self.boot_id, self.started)

    def running(self) -> bool:
        identity = process_identity(self.pid)
        return identity is not None and identity[:2] == (self.boot_id, self.started) and not identity[2]

    def terminate(self) -> bool:
        """SIGTERM to the child itself (it stops at the next step and writes its end line); False if it is gone."""
        return self._signal(os.kill, signal.SIGTERM)

    def kill_group(self) -> bool:
        """SIGKILL to the child's whole process group (the child and anything it started)."""
        return self._signal(os.killpg, signal.SIGKILL)

    def _signal(self, send, signum: int) -> bool:
        if not self.ours():
            return False
        with contextlib.suppress(ProcessLookupError):
            send(self.pid, signum)
            return True
        return False

    def stop(self, grace: float = STOP_GRACE_SECONDS, terminate: bool = True) -> None:
        """End the child at shutdown: SIGTERM, wait up to `grace` seconds for it to exit, then SIGKILL its process
        group (whatever it started, or the child itself if it did not stop). The group is signalled only while the
        child's pid is still ours: our own child stays a zombie until the caller reaps it (Popen.poll) afterwards."""
        if terminate:
            self.terminate()
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill_group()


class Children:
    """The runner's running children by run id: those it started (a Popen each) and those it adopted after a
    restart (known by child.json only). Every signal goes through a Child, so only a pid still ours is signalled."""

    def __init__(self):
        self._popen: dict[int, subprocess.Popen] = {}
        self._idents: dict[int, Child] = {}

    def __contains__(self, run_id: int) -> bool:
        return run_id in self._popen or run_id in self._idents

    def __bool__(self) -> bool:
        return bool(self._popen or self._idents)

    def start(self, run_id: int, cmd: list[str], run_dir: Path, env: dict) -> int:
        """Start a child in its own session, output to RUN_DIR/log.txt, identity to RUN_DIR/child.json; its pid."""
        path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # `-m training` from any folder
        with (run_dir / "log.txt").open("ab") as log:
            popen = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONPATH": path}, start_new_session=True
            )
        self._popen[run_id] = popen
        identity = Child.of(popen.pid)  # read at once: the start time is fixed at fork, the pid is ours until reaped
        if identity is not None:
            self._idents[run_id] = identity
            with contextlib.suppress(OSError):  # without it a later app cannot adopt the child, nothing worse
                identity.save(run_dir)
        return popen.pid

    def adopt(self, run_id: int, pid: int | None, run_dir: str | None) -> bool:
        """Watch the child of a run started by an earlier app, if child.json names `pid` and it still runs."""
        child = Child.load(run_dir)
        if child is None or child.pid != pid or not child.running():
            return False
        self._idents[run_id] = child
        return True

    def ended(self) -> list[tuple[int, int | None]]:
        """(run id, exit code: None for an adopted child) of each child that ended; they are no longer watched."""
        done = []
        for run_id in list(self._popen.keys() | self._idents.keys()):
            popen = self._popen.get(run_id)
            if popen.poll() is None if popen is not None else self._idents[run_id].running():
                continue
            self._popen.pop(run_id, None), self._idents.pop(run_id, None)
            done.append((run_id, popen.returncode if popen is not None else None))
        return done

    def terminate(self, run_id: int) -> None:
        """SIGTERM: the child stops at its next step and writes its end line."""
        if run_id in self._popen:
            self._popen[run_id].send_signal(signal.SIGTERM)  # Popen never signals a pid it has already reaped
        elif run_id in self._idents:
            self._idents[run_id].terminate()

    def stop_all(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """At shutdown: every child gets SIGTERM, then its process group SIGKILL after `grace` (Child.stop)."""
        for child in list(self._idents.values()):
            child.terminate()
        for child in list(self._idents.values()):
            child.stop(grace, terminate=False)
        for run_id, popen in self._popen.items():
            if run_id not in self._idents and popen.poll() is None:  # its identity could not be read: pid only
                popen.kill()
        deadline = time.monotonic() + REAP_SECONDS
        for popen in self._popen.values():  # a leader that exited may still be ending its other threads
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(max(0.1, deadline - time.monotonic()))

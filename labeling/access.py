"""Who may do what: roles, the users file, the caller behind a request, and per-user rate limits.

Every handler that changes or reveals data asks `Access.require(request, action)` first, on the server, whether
or not the button is visible: Gradio runs any handler posted to /gradio_api/queue/join by its fn_index.

Roles: admin (everything), annotator (label, own prompts, own counters), viewer (read-only Data and Leaderboard).
Without a users file, a server bound to a loopback address has one local user who may do everything; bound to
any other address, anyone may label but admin actions are refused until `--auth` (or Spaces OAuth) names admins.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from storage.passwords import is_hash, verify_password

ROLES = ("admin", "annotator", "viewer")
ACTIONS = {
    "label": ("admin", "annotator"),  # next pair, vote, undo, own prompts
    "read": ("admin", "annotator", "viewer"),  # Data tab counts, leaderboard
    "train": ("admin",),  # start, cancel
    "serve": ("admin",),  # activate / serve / promote a version
    "import": ("admin",),
    "export": ("admin",),
    "see_all": ("admin",),  # everyone's rationales and edits
}
ACTION_NAMES = {
    "label": "Labeling",
    "read": "Reading",
    "train": "Training",
    "serve": "Serving a version",
    "import": "Import",
    "export": "Export",
    "see_all": "Seeing everyone's rationales",
}
NAME_RULE = re.compile(r"^[^<>\r\n\t]{1,64}$")  # the annotator-name rule of labeling.services


class AccessDenied(PermissionError):
    """Shown to the caller as is; nothing was done."""


class AuthFileError(ValueError):
    """A users file that cannot be used: one clear line at start."""


@dataclass(frozen=True)
class User:
    name: str
    password: str  # a storage.passwords hash, or plaintext (warned about at start)
    role: str


@dataclass(frozen=True)
class Caller:
    name: str | None  # None: not logged in (no auth, or an anonymous caller)
    role: str | None  # None: may only label under a name it gives

    def may(self, action: str) -> bool:
        return self.role in ACTIONS[action]


def load_users(path: str | Path) -> tuple[dict[str, User], list[str]]:
    """The users file → users by name, plus warnings (plaintext passwords, the old format)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise AuthFileError(f"--auth {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise AuthFileError(f"--auth {path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise AuthFileError(f'--auth {path} must hold a JSON object {{"name": {{"password": ..., "role": ...}}}}')
    users, warnings, old_form = {}, [], []
    for name, entry in data.items():
        if not NAME_RULE.match(name) or name != name.strip():
            raise AuthFileError(f"--auth {path}: login {name!r} must be 1-64 characters without < > or line breaks")
        if isinstance(entry, str):
            old_form.append(name)
            entry = {"password": entry, "role": "annotator"}
        if not isinstance(entry, dict) or not isinstance(entry.get("password"), str) or not entry["password"]:
            raise AuthFileError(f'--auth {path}: {name!r} needs a non-empty "password"')
        role = entry.get("role", "annotator")
        if role not in ROLES:
            raise AuthFileError(f"--auth {path}: {name!r} has role {role!r}; use one of {', '.join(ROLES)}")
        users[name] = User(name, entry["password"], role)
    if old_form:
        warnings.append(
            f'--auth {path}: {", ".join(old_form)} use the old {{"name": "password"}} form and are annotators; '
            'write {"name": {"password": ..., "role": "admin"}} to make someone an admin'
        )
    plain = [u.name for u in users.values() if not is_hash(u.password)]
    if plain:
        warnings.append(
            f"--auth {path}: plaintext passwords for {', '.join(plain)}; "
            "store hashes made by `python -m storage hash-password` instead"
        )
    return users, warnings


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


PRUNE_AT = 10_000  # buckets kept before idle ones are dropped (one per client address or login)


class RateLimiter:
    """A token bucket per user: bursts of `burst`, then `rate` requests per second sustained.

    The defaults never refuse a person or a script working at a few requests per second; they refuse clear
    abuse (more than 20 requests/s for longer than a few seconds).
    """

    def __init__(self, rate: float = 20.0, burst: float = 100.0):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > PRUNE_AT:  # a bucket idle this long is full again: forgetting it changes nothing
                idle = self.burst / self.rate
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < idle}
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1, now)
            return True


@dataclass
class Access:
    """The server's answer to "who is calling, and may they?"."""

    users: dict[str, User] = field(default_factory=dict)  # empty: no --auth
    local: bool = True  # bound to a loopback address
    oauth: bool = False  # Hugging Face OAuth (Spaces)
    oauth_admins: frozenset[str] = frozenset()  # PREFLOOP_ADMINS
    limiter: RateLimiter = field(default_factory=RateLimiter)

    @property
    def logins(self) -> bool:
        """True when people log in (a users file or OAuth): their login is their annotator name."""
        return bool(self.users) or self.oauth

    def check_password(self, name: str, password: str) -> bool:
        user = self.users.get(name)
        return user is not None and verify_password(password, user.password)

    def caller(self, request) -> Caller:
        name = login_name(request)
        if self.users:
            user = self.users.get(name or "")
            return Caller(user.name, user.role) if user else Caller(None, None)
        if self.oauth:
            if not name:
                return Caller(None, None)
            return Caller(name, "admin" if name in self.oauth_admins else "annotator")
        if self.local:
            return Caller(None, "admin")  # the one local user; the name comes from the display-name box
        return Caller(None, "annotator")

    def require(self, request, action: str) -> Caller:
        """The caller, when allowed to do `action`; else AccessDenied with the reason."""
        who = self.caller(request)
        if who.may(action):
            return who
        if self.logins and who.name is None:
            raise AccessDenied("Log in first.")
        allowed = " and ".join(f"{role}s" for role in ACTIONS[action])
        if not self.logins and not self.local:
            raise AccessDenied(
                f"{ACTION_NAMES[action]} is for {allowed}: this server is reachable from other machines and has no "
                "logins; restart it with --auth users.json (or log in with Hugging Face on a Space)"
            )
        raise AccessDenied(f"{ACTION_NAMES[action]} is for {allowed}; you are logged in as {who.name} ({who.role}).")

    def annotator(self, request, claimed: str | None) -> str:
        """The name a labeling call acts for: the login under auth (another name is refused), else `claimed`."""
        who = self.require(request, "label")
        if claimed is not None and not isinstance(claimed, str):
            raise AccessDenied("A name is text.")
        # Without a login the bucket is the client's address, not the name it claims: new names would be new
        # buckets, and a flood under someone's name would lock them out. A call without a name does no work (every
        # service refuses an empty name): it takes from no bucket, else every anonymous page load would share one.
        key = who.name or ((claimed or "").strip() and f"client:{client_host(request)}")
        if key and not self.limiter.allow(key):
            raise AccessDenied("Too many requests: slow down (at most about 20 per second).")
        if who.name is None:
            return claimed or ""
        if claimed and claimed.strip() and claimed.strip() != who.name:
            raise AccessDenied(f"You are logged in as {who.name}: you cannot label as {claimed.strip()!r}.")
        return who.name


def client_host(request) -> str:
    """The address a request came from (the connection's, not a header a client could set)."""
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "")


def login_name(request) -> str | None:
    """The logged-in name of a Gradio request: the --auth login, or the Hugging Face OAuth username.

    OAuth: Gradio's login callback stores the provider's answer in the signed session cookie as
    session["oauth_info"] = {"userinfo": {"preferred_username": ...}, "expires_at": unix seconds, ...}
    (gradio/oauth.py); an expired login counts as logged out, as Gradio's own OAuthProfile injection does."""
    if request is None:
        return None
    name = getattr(request, "username", None)
    if name:
        return name
    info = _oauth_session(request).get("oauth_info") or {}
    expires = info.get("expires_at")
    if isinstance(expires, int | float) and expires < time.time():
        return None
    return (info.get("userinfo") or {}).get("preferred_username") or None


def _oauth_session(request) -> dict:
    """The session dict behind a gr.Request (its Starlette request's scope, set by the session middleware that
    Gradio installs with OAuth), or a plain `.session` (tests, requests rebuilt from kwargs); {} without one.
    Never `gr.Request.session` itself: that turns the dict into an attribute object."""
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    if isinstance(scope, dict):
        return scope.get("session") or {}
    try:
        session = getattr(underlying, "session", None)
    except (AssertionError, KeyError):  # Starlette asserts when no session middleware runs
        return {}
    return session if isinstance(session, dict) else {}


def access_from_env(users: dict[str, User], host: str) -> Access:
    """Access for this process: users file, loopback or not, Spaces OAuth with PREFLOOP_ADMINS."""
    on_spaces = bool(os.environ.get("SPACE_ID"))
    admins = frozenset(a.strip() for a in os.environ.get("PREFLOOP_ADMINS", "").split(",") if a.strip())
    return Access(users=users, local=is_loopback(host), oauth=on_spaces and not users, oauth_admins=admins)

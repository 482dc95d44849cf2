"""Running as a Space: logins with Hugging Face OAuth. Roles come from PREFLOOP_ADMINS, a signed-in visitor labels
under their username, an anonymous or forged one may not; the app here is a real `python app.py` process."""

from __future__ import annotations

import json
import time

import pytest

from tests.apprun import app_process, table

pytestmark = pytest.mark.slow


def oauth_request(name: str | None, expires_in: float = 3600, with_session: bool = True):
    """A real gr.Request around a Starlette request whose session holds what Gradio's OAuth callback stores."""
    import gradio as gr
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/gradio_api/queue/join", "headers": [], "query_string": b""}
    if with_session:
        info = {
            "access_token": "hf_oauth_x",
            "expires_at": int(time.time() + expires_in),
            "userinfo": {"preferred_username": name, "name": f"{name} (full name)"},
        }
        scope["session"] = {"oauth_info": info} if name else {}
    return gr.Request(request=Request(scope))


def test_oauth_usernames_get_roles_from_prefloop_admins(monkeypatch):
    from labeling.access import AccessDenied, access_from_env

    monkeypatch.setenv("SPACE_ID", "team/prefloop")
    monkeypatch.setenv("PREFLOOP_ADMINS", "alice, carol")
    access = access_from_env({}, "0.0.0.0")
    assert access.oauth and access.logins
    assert access.require(oauth_request("alice"), "train").name == "alice"
    assert access.require(oauth_request("carol"), "serve").role == "admin"
    bob = oauth_request("bob")
    assert access.caller(bob).role == "annotator" and access.annotator(bob, "") == "bob"
    with pytest.raises(AccessDenied, match="for admins; you are logged in as bob"):
        access.require(bob, "train")
    with pytest.raises(AccessDenied, match="cannot label as 'alice'"):
        access.annotator(bob, "alice")
    for anonymous in (
        oauth_request(None),
        oauth_request("alice", expires_in=-60),
        oauth_request("x", with_session=False),
    ):
        with pytest.raises(AccessDenied, match="Log in first"):  # no login, an expired one, no session middleware
            access.annotator(anonymous, "alice")
    monkeypatch.delenv("SPACE_ID")
    assert not access_from_env({}, "0.0.0.0").oauth  # not a Space: no OAuth


def session_cookie(secret: str, username: str) -> str:
    """The signed `session` cookie Gradio's /login/callback sets after a Hugging Face login (Starlette's
    SessionMiddleware with the key gradio/oauth.py derives from OAUTH_CLIENT_SECRET)."""
    import base64
    import hashlib

    import itsdangerous

    user = {"preferred_username": username, "name": username}
    info = {
        "access_token": "hf_oauth_x",
        "scope": "openid profile",
        "expires_at": int(time.time()) + 3600,
        "userinfo": user,
    }
    key = hashlib.sha256((secret + "-v4").encode()).hexdigest()
    data = base64.b64encode(json.dumps({"oauth_info": info}).encode())
    return itsdangerous.TimestampSigner(key).sign(data).decode()


@pytest.fixture
def openid_provider():
    """Serves the OpenID discovery document a Space's OPENID_PROVIDER_URL points at (no real login happens)."""
    import http.server
    import threading

    class Discovery(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            doc = {
                "issuer": base,
                "authorization_endpoint": f"{base}/oauth/authorize",
                "token_endpoint": f"{base}/oauth/token",
                "jwks_uri": f"{base}/oauth/jwks",
                "userinfo_endpoint": f"{base}/oauth/userinfo",
            }
            data = json.dumps(doc).encode()
            self.send_response(200 if self.path == "/.well-known/openid-configuration" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_space_logs_people_in_with_hugging_face(tmp_path, tiny_model_dir, openid_provider):
    """The app as a Space runs it (SYSTEM=spaces, SPACE_ID and the OAUTH_* variables hf_oauth: true provides): the
    page has the login button and routes, a signed-in visitor labels under their username, an anonymous one may
    not, and a CPU Space shows training as off."""
    import httpx
    from gradio_client import Client

    secret = "space-oauth-secret"
    env = {
        "SYSTEM": "spaces",
        "SPACE_ID": "team/prefloop",
        "SPACE_HARDWARE": "cpu-basic",
        "PREFLOOP_ADMINS": "alice",
        "OAUTH_CLIENT_ID": "client-id",
        "OAUTH_CLIENT_SECRET": secret,
        "OAUTH_SCOPES": "openid profile",
        "OPENID_PROVIDER_URL": openid_provider,
    }
    args = (
        "--db",
        str(tmp_path / "space.duckdb"),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--strategy",
        "self",
        "--queue-size",
        "3",
    )
    with app_process(tmp_path, tiny_model_dir, *args, env=env, name="space") as app:
        page = httpx.get(app.url, timeout=30).text
        assert "hf-login" in page and "allow-training" in page  # gr.LoginButton; the CPU Space training toggle
        login = httpx.get(app.url + "login/huggingface", timeout=30)
        assert login.status_code in (302, 307) and login.headers["location"].startswith(f"{openid_provider}/oauth/")

        bob = Client(app.url, verbose=False, headers={"Cookie": f"session={session_cookie(secret, 'bob')}"})
        pair_id = None
        for _ in range(240):
            pair_id, *_ = bob.predict("", api_name="/next_pair")  # no name given: the login is the annotator
            if pair_id is not None:
                break
            time.sleep(0.5)
        assert pair_id is not None
        with pytest.raises(Exception, match="You are logged in as bob"):
            bob.predict(pair_id, "alice", "A", "", "", api_name="/vote")
        assert bob.predict(pair_id, "", "B", "ok", "", api_name="/vote") == "ok"

        anonymous = Client(app.url, verbose=False)
        with pytest.raises(Exception, match="Log in first"):
            anonymous.predict("carol", api_name="/next_pair")
        forged = Client(app.url, verbose=False, headers={"Cookie": f"session={session_cookie('wrong', 'alice')}"})
        with pytest.raises(Exception, match="Log in first"):  # a cookie not signed with the Space's secret
            forged.predict("", api_name="/next_pair")
        assert app.terminate() == 143
    assert table(tmp_path / "space.duckdb", "SELECT annotator, choice FROM effective_comparisons") == [("bob", "B")]

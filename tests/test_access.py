"""Roles, the users file, password hashes, rate limits (a request here is any object with .username)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from labeling.access import Access, AccessDenied, AuthFileError, RateLimiter, access_from_env, is_loopback, load_users
from storage.passwords import hash_password, verify_password


def as_user(name):
    return SimpleNamespace(username=name)


def write(tmp_path, data) -> str:
    path = tmp_path / "users.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_hashes_verify_in_constant_time_and_plaintext_still_works():
    stored = hash_password("s3cret")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert verify_password("s3cret", stored) and not verify_password("s3cret!", stored)
    assert hash_password("s3cret") != stored  # salted
    assert verify_password("plain", "plain") and not verify_password("plain", "other")


def test_hash_password_command_prints_a_hash_that_verifies():
    out = subprocess.run([sys.executable, "-m", "storage", "hash-password"], input="pw\n", capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert verify_password("pw", json.loads(out.stdout))


def test_users_file_roles_old_form_and_warnings(tmp_path):
    users, warnings = load_users(write(tmp_path, {"alice": {"password": hash_password("a"), "role": "admin"},
                                                  "bob": {"password": "b", "role": "annotator"}}))  # fmt: skip
    assert users["alice"].role == "admin" and users["bob"].role == "annotator"
    assert any("plaintext" in w and "bob" in w for w in warnings)
    users, warnings = load_users(write(tmp_path, {"carol": "pw"}))
    assert users["carol"].role == "annotator" and any("old" in w for w in warnings)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not JSON"),
        ("[]", "JSON object"),
        ({"a<b": "pw"}, "must be 1-64 characters"),
        ({"dave": {"password": "pw", "role": "boss"}}, "role 'boss'"),
        ({"dave": {"role": "admin"}}, "password"),
    ],
)
def test_a_bad_users_file_is_one_clear_error(tmp_path, content, message):
    with pytest.raises(AuthFileError, match=message):
        load_users(write(tmp_path, content))
    with pytest.raises(AuthFileError, match="No such file"):
        load_users(tmp_path / "missing.json")


def test_roles_decide_each_action_on_the_server():
    users, _ = load_users_dict({"alice": "admin", "bob": "annotator", "vera": "viewer"})
    access = Access(users=users, local=True)
    assert access.require(as_user("alice"), "train").name == "alice"
    with pytest.raises(AccessDenied, match="for admins; you are logged in as bob"):
        access.require(as_user("bob"), "export")
    with pytest.raises(AccessDenied, match="Log in first"):
        access.require(as_user(None), "label")
    with pytest.raises(AccessDenied):
        access.require(as_user("vera"), "label")
    assert access.require(as_user("vera"), "read").role == "viewer"
    assert access.annotator(as_user("bob"), "") == "bob"
    with pytest.raises(AccessDenied, match="cannot label as 'alice'"):
        access.annotator(as_user("bob"), "alice")


def test_without_logins_loopback_is_admin_and_a_public_address_is_not(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    local, public = access_from_env({}, "127.0.0.1"), access_from_env({}, "0.0.0.0")
    assert local.require(as_user(None), "train").role == "admin"
    with pytest.raises(AccessDenied, match="--auth"):
        public.require(as_user(None), "train")
    assert public.annotator(as_user(None), "zoe") == "zoe"
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")


def test_spaces_oauth_admins_come_from_prefloop_admins(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "team/prefloop")
    monkeypatch.setenv("PREFLOOP_ADMINS", "alice, carol")
    access = access_from_env({}, "0.0.0.0")

    def oauth(name: str):
        return SimpleNamespace(username=None, session={"oauth_info": {"userinfo": {"preferred_username": name}}})

    assert access.require(oauth("alice"), "train").name == "alice"
    with pytest.raises(AccessDenied, match="for admins"):
        access.require(oauth("bob"), "train")
    assert access.annotator(oauth("bob"), None) == "bob"
    with pytest.raises(AccessDenied, match="Log in first"):
        access.require(SimpleNamespace(username=None, session={}), "label")


def test_rate_limit_allows_steady_work_and_refuses_floods():
    limiter = RateLimiter(rate=20.0, burst=100.0)
    assert all(limiter.allow("bob") for _ in range(100))  # a burst of 100 passes
    assert not limiter.allow("bob")  # the 101st at once is refused
    assert limiter.allow("carol")  # others are not affected


def load_users_dict(roles: dict[str, str]):
    from labeling.access import User

    return {name: User(name, "pw", role) for name, role in roles.items()}, []


def test_calls_without_a_name_take_from_no_rate_limit_bucket():
    """Every anonymous page load asks for the caller's name with none given: they used to share one bucket ("-"),
    so one client posting the page load 20 times a second locked every other visitor out."""
    access = Access(local=False)
    anonymous = SimpleNamespace(username=None, session={})
    assert all(access.annotator(anonymous, None) == "" for _ in range(500))  # a flood of name-less calls
    assert access.annotator(anonymous, "dave") == "dave"  # still served
    with pytest.raises(AccessDenied, match="Too many requests"):
        for _ in range(200):  # a flood under one name still meets the limit
            access.annotator(anonymous, "dave")


def test_the_leaderboard_timer_checks_the_caller_before_it_reads_the_store():
    """An anonymous visitor of a Space may not read: the timer's refresh answers nothing, and does not query (its
    handlers have no services here, so a query would fail) nor say whether anything changed."""
    import gradio as gr

    from ui.leaderboard_tab import LeaderboardHandlers

    handlers = LeaderboardHandlers(None, Access(local=False, oauth=True))
    anonymous = SimpleNamespace(username=None, session={})
    assert handlers.refresh_if_changed(None, anonymous) == [gr.skip()] * 9
    assert "Log in first" in handlers.refresh(anonymous)[0]


def test_without_logins_the_rate_limit_follows_the_client_not_the_name_it_claims():
    """New names were new buckets (a flood under mallory0…mallory299 passed), and a flood under 'alice' locked the
    real alice out; idle buckets are forgotten, so made-up keys cannot grow memory without bound."""
    import labeling.access as access_module

    access = Access(local=False)
    mallory, alice = (SimpleNamespace(username=None, session={}, client=SimpleNamespace(host=h))
                      for h in ("10.0.0.66", "10.0.0.7"))  # fmt: skip
    with pytest.raises(AccessDenied, match="Too many requests"):
        for i in range(300):
            access.annotator(mallory, f"mallory{i}")
    assert access.annotator(alice, "alice") == "alice"  # another client is not affected, whatever was claimed
    limiter = RateLimiter(rate=1e6, burst=1.0)  # a bucket is idle (full again) after a microsecond
    for i in range(access_module.PRUNE_AT + 50):
        limiter.allow(f"k{i}")
    assert len(limiter._buckets) < access_module.PRUNE_AT


def test_names_with_hidden_characters_and_pair_ids_that_are_not_whole_numbers_are_refused(tmp_path):
    from labeling.services import Services, UserError, pair_number

    services = Services(None, None, None, None)
    for name in ("ali\u2028ce", "ali\x85ce", "\u202eecila", "alice\u200b", 5):
        with pytest.raises(UserError):
            services.annotator_name(name)
    assert services.annotator_name(" Zoë ") == "Zoë"
    for bad in (1.9, True, "1_0", "١", None, float("inf")):
        with pytest.raises(UserError, match="There is no pair"):
            pair_number(bad)
    assert pair_number(7) == pair_number(" 7 ") == 7

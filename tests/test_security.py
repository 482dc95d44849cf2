"""Permissions live on the server: raw HTTP to /gradio_api/queue/join by fn_index, as an attacker would send it.

For each admin button, an anonymous caller and an annotator are refused and nothing is written (no run folder,
no row, no file); the admin succeeds. Identity: an annotator cannot label under another name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.passwords import hash_password
from tests import rawhttp
from tests.apphelpers import running_app, wait_for
from tests.datahelpers import seed_preferences

pytestmark = pytest.mark.slow

ADMIN_BUTTONS = ("train-start", "train-cancel", "train-activate", "version-activate", "import-btn", "export-btn")
USERS = {
    "alice": {"password": hash_password("alice-pw"), "role": "admin"},
    "bob": {"password": "bob-pw", "role": "annotator"},  # plaintext: loads with a warning
    "vera": {"password": hash_password("vera-pw"), "role": "viewer"},
}


def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.json"
    path.write_text(json.dumps(USERS))
    return path


def counts(services) -> dict:
    with services.store.read() as cur:
        return {
            table: cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("prompts", "comparisons", "training_runs", "model_versions")
        } | {"active": services.store.get_setting("active_version")}


def run_folders(services) -> list[str]:
    runs = Path(services.runner.runs_dir)
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def upload(http, path: Path) -> dict:
    answer = http.post("/gradio_api/upload", files={"files": (path.name, path.read_bytes())})
    answer.raise_for_status()
    return {"path": answer.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def test_admin_buttons_refuse_anonymous_and_annotators_and_work_for_admins(tmp_path, tiny_model_dir):
    with running_app(tmp_path, tiny_model_dir, "--auth", str(users_file(tmp_path)), queue_size=2) as (url, services):
        seed_preferences(services.store, 8)
        admin, bob = rawhttp.client(url, "alice", "alice-pw"), rawhttp.client(url, "bob", "bob-pw")
        anonymous = rawhttp.client(url)
        assert anonymous.get("/config").status_code == 401  # nothing to read without a login
        cfg = rawhttp.config(admin)
        index = {eid: rawhttp.fn_index(cfg, eid) for eid in ADMIN_BUTTONS}
        start = rawhttp.default_inputs(cfg, index["train-start"])
        rawhttp.set_input(cfg, index["train-start"], start, "Max steps", "1")  # the admin's run must be quick

        dataset = tmp_path / "prompts.txt"
        dataset.write_text("A prompt from an upload\nAnother uploaded prompt\n")
        refused_inputs = {
            "train-start": start,
            "train-cancel": [1],
            "train-activate": [1],
            "version-activate": [1, None],
            "import-btn": [upload(admin, dataset), "auto"],
            "export-btn": ["raw", ".jsonl"],
        }
        before, folders = counts(services), run_folders(services)
        for eid, data in refused_inputs.items():
            status, _ = rawhttp.call(anonymous, index[eid], data)
            assert status == 401, eid
            status, output = rawhttp.call(bob, index[eid], data)
            assert status == 200 and "for admins" in rawhttp.text_of(output), (eid, output)
            if eid == "export-btn":
                assert output[0] is None  # no file offered
        assert counts(services) == before and run_folders(services) == folders  # nothing written

        # The admin succeeds at each.
        _, output = rawhttp.call(admin, index["import-btn"], refused_inputs["import-btn"])
        assert "Imported 2 prompts" in rawhttp.text_of(output)
        _, output = rawhttp.call(admin, index["export-btn"], ["raw", ".jsonl"])
        assert output[0] is not None and "rows in" in output[1]
        _, output = rawhttp.call(admin, index["train-start"], start)
        assert "Run #1 started" in rawhttp.text_of(output), output
        assert run_folders(services)
        wait_for(lambda: services.runner.status(1).status in ("succeeded", "failed"), 300, "the admin's run")
        assert services.runner.status(1).status == "succeeded", services.runner.status(1).error
        version = services.runner.status(1).result_version
        for who in (bob,):  # an annotator cannot serve what the admin trained
            _, output = rawhttp.call(who, index["train-activate"], [1])
            assert "for admins" in rawhttp.text_of(output)
            _, output = rawhttp.call(who, index["version-activate"], [version, None])
            assert "for admins" in rawhttp.text_of(output)
        assert services.engine.active_version == 0
        _, output = rawhttp.call(admin, index["train-activate"], [1])
        assert "is now serving" in rawhttp.text_of(output) and services.engine.active_version == version
        _, output = rawhttp.call(admin, index["version-activate"], [0, None])
        assert "is now serving" in rawhttp.text_of(output) and services.engine.active_version == 0
        _, output = rawhttp.call(admin, index["train-start"], start)
        run2 = services.runner.runs()[0]["id"]
        _, output = rawhttp.call(bob, index["train-cancel"], [run2])
        assert "for admins" in rawhttp.text_of(output)
        _, output = rawhttp.call(admin, index["train-cancel"], [run2])
        assert f"Run #{run2}" in rawhttp.text_of(output) and "⚠️" not in rawhttp.text_of(output)


def test_annotators_label_only_as_themselves(tmp_path, tiny_model_dir):
    from gradio_client import Client

    with running_app(tmp_path, tiny_model_dir, "--auth", str(users_file(tmp_path)), queue_size=2) as (url, services):
        bob = Client(url, auth=("bob", "bob-pw"), verbose=False)
        with pytest.raises(Exception, match="logged in as bob"):
            bob.predict("alice", api_name="/next_pair")
        pair_id, *_ = bob.predict("bob", api_name="/next_pair")
        assert pair_id is not None
        with pytest.raises(Exception, match="logged in as bob"):
            bob.predict(pair_id, "alice", "A", "", "", api_name="/vote")
        assert counts(services)["comparisons"] == 0
        assert bob.predict(pair_id, "bob", "A", "", "", api_name="/vote") == "ok"
        with services.store.read() as cur:
            assert cur.execute("SELECT annotator FROM comparisons").fetchall() == [("bob",)]
        viewer = Client(url, auth=("vera", "vera-pw"), verbose=False)
        with pytest.raises(Exception, match="for admins|label"):
            viewer.predict("vera", api_name="/next_pair")


def test_without_auth_on_a_public_address_admin_actions_name_auth(tmp_path, tiny_model_dir):
    with running_app(tmp_path, tiny_model_dir, "--host", "0.0.0.0", queue_size=2) as (url, services):
        seed_preferences(services.store, 8)
        http = rawhttp.client(url)
        cfg = rawhttp.config(http)
        start = rawhttp.default_inputs(cfg, rawhttp.fn_index(cfg, "train-start"))
        _, output = rawhttp.call(http, rawhttp.fn_index(cfg, "train-start"), start)
        assert "--auth" in rawhttp.text_of(output)
        assert services.runner.runs() == [] and run_folders(services) == []
        _, output = rawhttp.call(http, rawhttp.fn_index(cfg, "export-btn"), ["raw", ".jsonl"])
        assert output[0] is None and "--auth" in rawhttp.text_of(output)
        before = counts(services)
        for elem_id in (*ADMIN_BUTTONS, "promote-btn"):  # every admin action, as posted with the page's inputs
            index = rawhttp.fn_index(cfg, elem_id)
            _, output = rawhttp.call(http, index, rawhttp.default_inputs(cfg, index))
            assert "--auth" in rawhttp.text_of(output), elem_id
        assert counts(services) == before and services.runner.runs() == [] and run_folders(services) == []

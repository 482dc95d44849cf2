"""Every handler the page or a script can reach, posted over raw HTTP by fn_index as an attacker would send it.

One app with a users file (admin alice, annotator bob, viewer vera) and data that is not bob's or vera's: another
annotator's judgements with rationales, edits and a typed prompt, a pair leased to them, an own-prompt pair of
theirs, the admin's judgement, a finished run with a log and a model version it made. Every dependency in /config
(clicks, ticks, loads, selects, changes, submits, `then`s and the named API endpoints) is called as (a) no login,
(b) the viewer and (c) the annotator, with the page's default inputs, hostile values (None, wrong types, a huge
string, negative and huge numbers) and the ids of things that are not the caller's. After every call:

- the store changed only as the caller's role allows (labeling/access.py ACTIONS): a viewer changes nothing; an
  annotator only adds their own judgements, leases, skips and own prompts; nobody but an admin touches runs,
  versions, the serving version, promotions, settings or imports, and no export file is made;
- nothing the role may not see came back: another person's name, rationale, edit, typed prompt or held pair, the
  admin's rationale, a run's log, error or metrics, an export file;
- the server answered (a result, an error or a refusal; never a 5xx), and it still serves everyone afterwards.

Training is never started: the admin is only asked to read and export after the sweep.
"""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest

from labeling import deploy
from labeling.access import RateLimiter
from labeling.pair_leases import utc_now
from tests import rawhttp
from tests.apphelpers import running_app
from tests.datahelpers import seed_preferences
from tests.test_engine import make_adapter
from tests.test_security import users_file

pytestmark = pytest.mark.slow

OTHER = "zed_other_annotator"  # judges, holds a pair and typed a prompt; never logs in here
SECRETS = {  # what neither the viewer nor the annotator may see
    "other's name": OTHER,
    "other's rationale": "SECRET-OTHER-RATIONALE",
    "other's edit": "SECRET-OTHER-EDIT",
    "other's typed prompt": "SECRET-OTHER-TYPED-PROMPT",
    "other's held own prompt": "SECRET-OTHER-HELD-PROMPT",
    "other's held own answer": "SECRET-OTHER-HELD-ANSWER",
    "admin's rationale": "SECRET-ADMIN-RATIONALE",
    "run log": "SECRET-RUN-LOG",
    "run error": "SECRET-RUN-ERROR",
    "run metrics": "SECRET-RUN-METRIC",
}
BOB_OWN = "BOB-OWN-RATIONALE"  # bob may see his own rationale; the viewer may not
ROLES = {"viewer": ("vera", "vera-pw"), "annotator": ("bob", "bob-pw")}
HUGE = "x" * 200_000
HOSTILE = {  # every input of the handler at once
    "none": None,
    "negative": -1,
    "huge number": 10**18,
    "huge string": HUGE,
    "dict": {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
    "list": [1, "two", None],
}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("every-handler")
    with pytest.MonkeyPatch.context() as patch:
        # A CPU Space: the Train tab gets its "Allow training" toggle, two more handlers to call.
        patch.setattr(deploy, "on_cpu_space", lambda engine: True)
        # The sweep posts hundreds of labeling calls a second as bob: without this most would stop at the rate
        # limit ("Too many requests") before reaching the checks this test is about.
        patch.setattr(RateLimiter, "allow", lambda self, key: True)
        # Exports go to a temp folder of this test's own (another test process may be exporting into /tmp).
        (tmp / "tmp").mkdir()
        patch.setattr(tempfile, "tempdir", str(tmp / "tmp"))
        args = ("--auth", str(users_file(tmp)), "--strategy", "self")
        with running_app(tmp, tiny_model_dir, *args, queue_size=2) as (url, services):
            ids = seed(services, tmp, tiny_model_dir)
            yield url, services, ids


def seed(services, tmp: Path, model_dir: Path) -> dict:
    """Data that belongs to others (see the module docstring); the ids the sweep aims at."""
    store, queue = services.store, services.queue
    seed_preferences(store, 4, annotator=OTHER)

    def judged(annotator, prompt_text, source, via="ui", **texts):
        prompt = store.add_prompt([{"role": "user", "content": prompt_text}], source)
        a = store.add_generation(prompt, f"An answer to {prompt_text}", model_version_id=0, params={"seed": 1})
        b = store.add_generation(prompt, "Another answer.", model_version_id=0, params={"seed": 2})
        store.add_comparison(
            prompt_id=prompt, generation_a=a, generation_b=b, annotator=annotator, choice="A", source=via, **texts
        )

    judged(OTHER, SECRETS["other's typed prompt"], "own", rationale=SECRETS["other's rationale"],
           edited_answer=SECRETS["other's edit"])  # fmt: skip
    judged("alice", "What does the admin think?", "test", rationale=SECRETS["admin's rationale"])
    judged("bob", "What did bob judge before?", "test", via="test", rationale=BOB_OWN)  # undo takes page votes only

    held = queue.next_pair(OTHER)  # a pair another annotator holds now
    assert held is not None
    prompt = store.add_prompt([{"role": "user", "content": SECRETS["other's held own prompt"]}], "own")
    gens = [
        store.add_generation(prompt, SECRETS["other's held own answer"] + f" {side}", model_version_id=0, params={})
        for side in "ab"
    ]
    with store.transaction(lock="pairs") as cur:
        expires = utc_now() + timedelta(days=1)
        own_pair = queue._insert_pair(cur, prompt, "own", gens, "leased", OTHER, expires)

    run_dir = tmp / "finished-run"
    run_dir.mkdir()
    (run_dir / "log.txt").write_text(f"step 1 {SECRETS['run log']}\n")
    (run_dir / "progress.jsonl").write_text(json.dumps({"event": "progress", "step": 1, "total": 1}) + "\n")
    base = store.get_version(0)["base_model"]
    with store.transaction() as cur:
        run_id = cur.execute(
            "INSERT INTO training_runs (id, method, status, config, run_dir, snapshot_rows, parent_version, "
            "metrics, error) VALUES (nextval('training_runs_id_seq'), 'dpo', 'succeeded', '{}', ?, 4, 0, ?, ?) "
            "RETURNING id",
            [str(run_dir), json.dumps({"note": SECRETS["run metrics"]}), SECRETS["run error"]],
        ).fetchone()[0]
    adapter = make_adapter(model_dir, tmp / "adapter")  # a version an admin can really serve (a candidate)
    version = store.add_version(
        kind="policy", base_model=base, adapter_path=str(adapter), parent_id=0, run_id=run_id, notes="made by the run"
    )
    with store.transaction() as cur:
        cur.execute("UPDATE training_runs SET result_version = ? WHERE id = ?", [version, run_id])
    return {
        "held": held["pair_id"],
        "held_answers": (held["answer_a"], held["answer_b"]),
        "own_pair": own_pair,
        "run": run_id,
        "version": version,
    }


# ---- what the store holds, and which changes a role may make ------------------------------------------------------
def snapshot(services) -> dict:
    with services.store.read() as cur:

        def rows(sql):
            return cur.execute(sql).fetchall()

        return {
            "comparisons": set(
                rows("SELECT id, annotator, choice, rationale, edited_answer, supersedes FROM comparisons")
            ),
            "pairs": {r[0]: r[1:] for r in rows("SELECT id, status, leased_to, strategy FROM pairs")},
            "prompts": dict(rows("SELECT id, source FROM prompts")),
            "annotators": {r[0] for r in rows("SELECT name FROM annotators")},
            "runs": set(rows("SELECT id, status, run_dir, error, result_version, pid FROM training_runs")),
            "versions": set(rows("SELECT id, kind, status, adapter_path FROM model_versions")),
            "promotions": rows("SELECT count(*) FROM promotions")[0][0],
            "settings": {k: v for k, v in rows("SELECT key, value FROM app_settings") if not k.startswith("tallies:")},
            "active": services.engine.active_version,
            "run_folders": sorted(p.name for p in Path(services.runner.runs_dir).glob("*")),
            "exports": sorted(p.name for p in Path(tempfile.gettempdir()).glob("prefloop-export-*")),
        }


def forbidden_changes(before: dict, after: dict, role: str, name: str) -> list[str]:
    """What changed that `role` may not change (an annotator labels as themselves; a viewer changes nothing)."""
    labels = role == "annotator"
    problems = [
        f"{key} changed" for key in ("runs", "versions", "promotions", "settings", "active", "run_folders", "exports")
        if before[key] != after[key]
    ]  # fmt: skip
    if before["comparisons"] - after["comparisons"]:
        problems.append("comparisons were removed")
    added = after["comparisons"] - before["comparisons"]
    problems += [f"comparison {row} stored" for row in added if not labels or row[1] != name]
    for pair_id, was in before["pairs"].items():
        now = after["pairs"].get(pair_id)
        if now != was and not (labels and name in (was[1], now and now[1])):
            problems.append(f"pair {pair_id} went from {was} to {now}")
    for pair_id in after["pairs"].keys() - before["pairs"].keys():  # the queue refills in the background
        status, holder, strategy = after["pairs"][pair_id]
        if (holder is not None or strategy == "own") and not (labels and holder == name):
            problems.append(f"new pair {pair_id} {after['pairs'][pair_id]}")
    if before["prompts"].keys() - after["prompts"].keys():
        problems.append("prompts were removed")
    new_prompts = {after["prompts"][p] for p in after["prompts"].keys() - before["prompts"].keys()}
    if new_prompts - ({"own"} if labels else set()):
        problems.append(f"prompts added from {new_prompts}")
    if after["annotators"] - before["annotators"] - ({name} if labels else set()):
        problems.append(f"annotators added: {after['annotators'] - before['annotators']}")
    return problems


def leaks(output, role: str, ids: dict, posted: list) -> list[str]:
    """What came back that `role` may not see; a value the caller posted itself and sees echoed is no leak."""
    text, sent = json.dumps(output, default=str), json.dumps(posted, default=str)
    found = [what for what, secret in SECRETS.items() if secret in text and secret not in sent]
    found += ["bob's rationale"] if role == "viewer" and BOB_OWN in text else []
    found += ["the other's held pair"] if any(len(a) > 20 and a in text for a in ids["held_answers"]) else []
    found += ["a file"] if files_in(output) else []
    return found


def files_in(output) -> list:
    """Files a handler hands out (FileData: a dict with a path or url), anywhere in its output."""
    if isinstance(output, dict):
        own = [output] if ("path" in output or "url" in output) else []
        return own + [f for value in output.values() for f in files_in(value)]
    if isinstance(output, list):
        return [f for value in output for f in files_in(value)]
    return []


# ---- the calls ---------------------------------------------------------------------------------------------------
def describe(cfg: dict, dep: dict) -> str:
    by_id = {c["id"]: c for c in cfg["components"]}
    targets = [
        f"{by_id.get(t[0], {}).get('props', {}).get('elem_id') or by_id.get(t[0], {}).get('type', 'page')}.{t[1]}"
        for t in dep["targets"]
    ]
    return f"#{dep['id']} {dep.get('api_name')} ({', '.join(targets) or 'API'})"


def variants(cfg: dict, dep: dict, ids: dict) -> list[tuple[str, list]]:
    """The data lists posted to one handler: its defaults, each hostile value in every input, and for small
    handlers each id of something not the caller's in one input at a time (the others at their defaults)."""
    default = rawhttp.default_inputs(cfg, dep["id"])
    n = len(default)
    out = [("default", default)] + [(name, [value] * n) for name, value in HOSTILE.items()]
    aimed = {
        "other's held pair": str(ids["held"]),
        "other's own pair": str(ids["own_pair"]),
        "run": ids["run"],
        "version": ids["version"],
    }  # claiming another's name: the named endpoints' cases below (page handlers take the name from a State)
    if n <= 5:
        for position in range(n):
            out += [(f"{what} in input {position}", _with(default, position, v)) for what, v in aimed.items()]
    if dep.get("api_name") == "vote":  # the named endpoint: a full, well-formed vote on pairs that are not yours
        for pair in (ids["held"], ids["own_pair"]):
            for who in ("bob", "", None, "alice"):
                out += [(f"vote on {pair} as {who!r}", [pair, who, "A", "why", "better"])]
                out += [(f"skip {pair} as {who!r}", [pair, who, "skip", "", ""])]
    if dep.get("api_name") == "next_pair":
        out += [(f"next pair as {who!r}", [who]) for who in ("alice", OTHER, "vera", "bob", " bob ", "")]
    unique, seen = [], set()
    for label, data in out:
        key = json.dumps(data, default=str)
        if key not in seen:
            seen.add(key)
            unique.append((label, data))
    return unique


def _with(values: list, position: int, value) -> list:
    changed = list(values)
    changed[position] = value
    return changed


def test_every_handler_refuses_what_each_role_may_not_do(app):
    url, services, ids = app
    admin = rawhttp.client(url, "alice", "alice-pw")
    cfg = rawhttp.config(admin)
    deps = cfg["dependencies"]
    assert len(deps) >= 40 and any(d.get("api_name") == "vote" for d in deps)
    assert any(d["targets"] and d["targets"][0][1] == "input" for d in deps)  # the CPU Space's training toggle

    anonymous = rawhttp.client(url)
    for dep in deps:  # no login: nothing is even queued
        for data in (rawhttp.default_inputs(cfg, dep["id"]), [None] * len(dep["inputs"])):
            status, _ = rawhttp.call(anonymous, dep["id"], data)
            assert status == 401, (describe(cfg, dep), status)

    calls, problems = 0, []
    for role, (name, password) in ROLES.items():
        http = rawhttp.client(url, name, password)
        for dep in deps:
            # The store is compared before and after all of one handler's calls (every change allowed to
            # one of them is allowed to all: the same handler, the same caller).
            cases = variants(cfg, dep, ids)
            before = snapshot(services)
            answers = [rawhttp.call(http, dep["id"], data) for _, data in cases]
            after = snapshot(services)
            calls += len(cases)
            where = f"{role} {name}: {describe(cfg, dep)}"
            problems += [f"{where}: {p}" for p in forbidden_changes(before, after, role, name)]
            for (label, data), (status, output) in zip(cases, answers, strict=True):
                if status not in (200, 422):  # a result, an error or a refusal; never a server error
                    problems.append(f"{where} with {label}: HTTP {status}")
                found = leaks(output, role, ids, data)
                problems += [f"{where} with {label}: {what} came back: {str(output)[:200]}" for what in found]
        assert not problems, "\n".join(problems[:40])
    assert calls > 700, calls

    # The app still works for everyone, and the checks above were not vacuous: each role gets what it may.
    data = {d.get("api_name"): d["id"] for d in deps}
    vera, bob = rawhttp.client(url, "vera", "vera-pw"), rawhttp.client(url, "bob", "bob-pw")
    _, shown = rawhttp.call(vera, data["stats"], [])
    assert "comparisons" in rawhttp.text_of(shown) and not leaks(shown, "viewer", ids, [])
    _, shown = rawhttp.call(bob, data["stats"], [])
    assert BOB_OWN in json.dumps(shown) and not leaks(shown, "annotator", ids, [])
    _, shown = rawhttp.call(vera, data["refresh"], [])
    assert "battles" in rawhttp.text_of(shown) or "No battles" in rawhttp.text_of(shown)
    _, shown = rawhttp.call(admin, data["stats"], [])
    text = json.dumps(shown)
    assert OTHER in text and SECRETS["other's rationale"] in text and SECRETS["admin's rationale"] in text
    _, shown = rawhttp.call(admin, data["do_export"], ["raw", ".jsonl"])
    assert isinstance(shown[0], dict) and "rows in" in shown[1], shown
    _, shown = rawhttp.call(admin, data["watch_2"], [ids["run"]])
    assert SECRETS["run error"] in json.dumps(shown) and SECRETS["run metrics"] in json.dumps(shown)
    _, shown = rawhttp.call(admin, data["serve_version"], [ids["version"], None])  # the sweep's target was real
    assert "is now serving" in rawhttp.text_of(shown) and services.engine.active_version == ids["version"], shown
    _, shown = rawhttp.call(admin, data["serve_version"], [0, None])
    assert "is now serving" in rawhttp.text_of(shown) and services.engine.active_version == 0, shown
    _, shown = rawhttp.call(admin, data["next_pair"], ["alice"])
    assert isinstance(shown, list) and shown[0] is not None, shown

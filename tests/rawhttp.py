"""Talk to a running Gradio app the way an attacker would: /login, /config, /gradio_api/queue/join by fn_index."""

from __future__ import annotations

import json
import secrets

import httpx


def client(url: str, user: str | None = None, password: str | None = None) -> httpx.Client:
    """An HTTP client; logged in (cookie) when a user is given."""
    http = httpx.Client(base_url=url.rstrip("/"), timeout=120)
    if user is not None:
        answer = http.post("/login", data={"username": user, "password": password})
        assert answer.status_code == 200, answer.text
    return http


def config(http: httpx.Client) -> dict:
    answer = http.get("/config")
    answer.raise_for_status()
    return answer.json()


def fn_index(cfg: dict, elem_id: str, event: str = "click") -> int:
    """The fn_index of the first `event` handler of the component with this elem_id (as /config lists them)."""
    ids = [c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == elem_id]
    assert ids, f"no component with elem_id {elem_id}"
    for dep in cfg["dependencies"]:
        if any(target[0] == ids[0] and target[1] == event for target in dep["targets"]):
            return dep["id"]
    raise AssertionError(f"no {event} handler on #{elem_id}")


def default_inputs(cfg: dict, index: int) -> list:
    """Each input's value as the page would send it untouched (the component's default)."""
    dep = next(d for d in cfg["dependencies"] if d["id"] == index)
    by_id = {c["id"]: c for c in cfg["components"]}
    return [by_id[i].get("props", {}).get("value") for i in dep["inputs"]]


def set_input(cfg: dict, index: int, data: list, label_start: str, value) -> None:
    """Set the input whose component label starts with `label_start` (inputs given as a set have no fixed order)."""
    dep = next(d for d in cfg["dependencies"] if d["id"] == index)
    by_id = {c["id"]: c for c in cfg["components"]}
    for position, component_id in enumerate(dep["inputs"]):
        if str(by_id[component_id].get("props", {}).get("label", "")).startswith(label_start):
            data[position] = value
            return
    raise AssertionError(f"no input labelled {label_start}")


def call(http: httpx.Client, index: int, data: list) -> tuple[int, list | str | None]:
    """Post one event to the queue and read its result: (HTTP status of the join, output data or error)."""
    session = secrets.token_hex(8)
    joined = http.post(
        "/gradio_api/queue/join", json={"data": data, "fn_index": index, "session_hash": session, "event_data": None}
    )
    if joined.status_code != 200:
        return joined.status_code, None
    with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed":
                output = message.get("output") or {}
                if not message.get("success", False):
                    return 200, f"error: {output.get('error')}"
                return 200, output.get("data")
    return 200, None


def text_of(output) -> str:
    """Every string inside an output (messages are Markdown strings or updates), joined for matching."""
    if isinstance(output, str):
        return output
    if isinstance(output, dict):
        return " ".join(text_of(v) for v in output.values())
    if isinstance(output, list):
        return " ".join(text_of(v) for v in output)
    return ""

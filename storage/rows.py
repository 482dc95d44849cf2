"""What a stored row may hold: chat prompts, judgement choices, annotator names, size limits (no database here)."""

from __future__ import annotations

import hashlib
import json

ROLES = ("system", "user", "assistant")
CHOICES = ("A", "B", "tie", "both_bad", "skip")
MAX_FIELD_CHARS = 1_000_000  # one prompt or answer; larger input is refused, not truncated


def canonical_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as a validated chat: [{"role", "content"}...] ending with a user message."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("a prompt must be a non-empty string or a non-empty list of chat messages")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message {i + 1} needs a role among {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i + 1} has no text content")
        if len(content) > MAX_FIELD_CHARS:
            raise ValueError(f"message {i + 1} is over {MAX_FIELD_CHARS:,} characters")
        if not is_unicode(content):
            raise ValueError(f"message {i + 1} {NOT_UNICODE}")
        messages.append({"role": message["role"], "content": content})
    if messages[-1]["role"] != "user":
        raise ValueError("the last message of a prompt must come from the user")
    if not messages[-1]["content"].strip():
        raise ValueError("the prompt is empty")
    return messages


def is_unicode(text: str) -> bool:
    """False for a string UTF-8 cannot hold: one with a lone surrogate (JSON's "\\ud800" parses to one in Python),
    which no store accepts; caught at the edge so the error names the field and not the database."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOT_UNICODE = "holds a character that is not valid Unicode (a lone surrogate such as \\ud800)"


def prompt_hash(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def annotator_name(name: str) -> str:
    """The stored form of an annotator's name (stripped); ValueError when there is none."""
    name = (name or "").strip() if isinstance(name, str) else ""
    if not name:
        raise ValueError("every judgement needs an annotator name")
    if not is_unicode(name):
        raise ValueError(f"the annotator name {NOT_UNICODE}")
    return name


def check_judgement(choice: str, rationale: str | None, edited_answer: str | None) -> None:
    """ValueError for a choice outside CHOICES or a rationale / edited answer over MAX_FIELD_CHARS."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}, not {choice!r}")
    for label, value in (("rationale", rationale), ("edited answer", edited_answer)):
        if value is not None and len(value) > MAX_FIELD_CHARS:
            raise ValueError(f"the {label} is over {MAX_FIELD_CHARS:,} characters")
        if value is not None and not is_unicode(value):
            raise ValueError(f"the {label} {NOT_UNICODE}")

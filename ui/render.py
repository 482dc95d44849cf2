"""How data becomes page text: prompts, answers and rationales are shown as text, never as markup."""

from __future__ import annotations

import html
import json


def render_messages(messages: list[dict] | str) -> str:
    """A prompt (or chat history) as markdown; roles in bold, raw HTML escaped so data never becomes markup."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    parts = []
    for message in messages:
        role = message.get("role", "user")
        if role == "system":
            parts.append(f"*system:* {escape_html(message['content'])}")
        else:
            parts.append(f"**{role}:** {escape_html(message['content'])}")
    return "\n\n".join(parts)


def escape_html(text: str) -> str:
    """Escape angle brackets outside code fences; markdown code blocks stay readable as written."""
    out, fenced = [], False
    for line in (text or "").split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append(line)
        else:
            out.append(line if fenced else html.escape(line, quote=False))
    return "\n".join(out)

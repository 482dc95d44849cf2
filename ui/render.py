"""How data becomes page text: prompts, answers and rationales render as sanitised Markdown, never as markup.

Everything shown comes from people and imported datasets, so it is untrusted. markdown-it renders it with raw
HTML turned off (tags show as text, inside and outside code fences), links only for http(s)/mailto, and images
replaced by their alt text and address: no remote image loads, so no tracking pixel fires on a labeler's screen.
"""

from __future__ import annotations

import html
import json
import re

from markdown_it import MarkdownIt

SAFE_SCHEMES = ("http://", "https://", "mailto:")


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable("table").enable("strikethrough")
    md.validateLink = lambda url: url.strip().lower().startswith(SAFE_SCHEMES)
    md.add_render_rule("image", _image_as_text)
    md.add_render_rule("link_open", _link_open)
    return md


def _link_open(self, tokens, idx, options, env) -> str:
    tokens[idx].attrSet("rel", "nofollow noopener noreferrer")
    tokens[idx].attrSet("target", "_blank")
    return self.renderToken(tokens, idx, options, env)


def _image_as_text(self, tokens, idx, options, env) -> str:
    token = tokens[idx]
    alt = html.escape("".join(child.content for child in token.children or []))
    src = html.escape(token.attrGet("src") or "")
    return f'<span class="blocked-image">[image: {alt or "no description"} · {src} · not loaded]</span>'


_MD = _markdown()


def render_text(text: str | None) -> str:
    """One answer, prompt or rationale as safe HTML."""
    return _MD.render(text or "")


def render_messages(messages: list[dict] | str) -> str:
    """A prompt (or chat history) as safe HTML; each message headed by its role."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    parts = []
    for message in messages:
        role = html.escape(str(message.get("role", "user")))
        parts.append(f'<div class="msg msg-{role}"><b>{role}:</b>{render_text(message.get("content", ""))}</div>')
    return "\n".join(parts)


def plain(text) -> str:
    """Text from elsewhere (a file name, an importer's or a server's error, a person's name, a model name) shown
    literally inside a Markdown component: every Markdown and HTML punctuation mark is backslash-escaped, so no
    link, image, tag, emphasis or heading comes out of it."""
    return _PLAIN.sub(r"\\\1", str(text))


_PLAIN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>:=&$\"'])")

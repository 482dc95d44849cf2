"""The import formats: which one a record is, and each record turned into a validated `Item`.

An Item is a prompt (a chat message list ending with a user message) and, for preference data, two answers
(side A and side B), the choice and the annotator. Parsers raise ValueError with a message naming the field;
the importer adds the file and the line or row.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.db import canonical_messages
from storage.errors import ImportFailed

FORMATS = ("txt", "csv", "prompts", "trl", "hh", "ultrafeedback", "arena", "shp")
PROMPT_FORMATS = ("txt", "csv", "prompts")
PROMPT_KEYS = ("prompt", "instruction", "question", "text")
KNOWN_SHAPES = (
    "txt (one prompt per line), csv (a prompt column), "
    "prompts (prompt | instruction | question | text | messages), trl (chosen, rejected [, prompt]), "
    "hh (chosen, rejected as 'Human:'/'Assistant:' transcripts), ultrafeedback (prompt, chosen, rejected, "
    "score_chosen, score_rejected), arena (model_a, model_b, winner, conversation_a, conversation_b, judge), "
    "shp (history, human_ref_A, human_ref_B, labels)"
)
ARENA_CHOICES = {"model_a": "A", "model_b": "B", "tie": "tie", "tie (bothbad)": "both_bad"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass(frozen=True)
class Answer:
    text: str
    model_name: str
    params: dict = field(default_factory=dict)


@dataclass
class Item:
    """One validated record: a prompt, and for preference data the two answers, the choice and who judged."""

    where: str
    prompt: list[dict]
    answers: tuple[Answer, Answer] | None = None
    choice: str | None = None
    annotator: str | None = None

    def dedupe_key(self, fmt: str) -> str:
        content = [fmt, self.prompt, [[a.text, a.model_name] for a in self.answers or ()], self.choice, self.annotator]
        return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def require_object(record: Any, fmt: str) -> dict:
    if not isinstance(record, dict):
        found = "a line of text" if isinstance(record, str) else type(record).__name__
        raise ValueError(f"format {fmt} needs an object with its columns per row, found {found}")
    return record


# ---- which format ------------------------------------------------------------------------------------------
def detect_format(path: Path, records: list[tuple[str, Any]]) -> str:
    """The format of the file's rows: every row must be of the first row's format, or the import fails naming the
    first row that is not (a file that mixes formats would otherwise be read wrongly: preference rows after a
    prompt-only first row imported as prompts, their answers dropped). A row that is neither a text nor an object is
    left to the parser, which names it."""
    fmt, first = None, None
    for where, record in records:
        if fmt is not None and not isinstance(record, str | dict):
            continue
        found = row_format(path, where, record)
        if fmt is None:
            fmt, first = found, where
        elif found != fmt:
            raise ImportFailed(
                path,
                f"this row is in format {found}, but {first} is in format {fmt}: a file holds one format "
                "(or name the format to read it in, not auto)",
                where,
            )
    return fmt


def row_format(path: Path, where: str, record: Any) -> str:
    """The format one row is in, by its columns (and, for chosen/rejected, by what the chosen answer holds)."""
    if isinstance(record, str):
        return "txt" if path.suffix.lower() == ".txt" else "prompts"  # e.g. a JSON list of strings
    if not isinstance(record, dict):
        raise ImportFailed(path, f"expected an object per row, found {type(record).__name__}", where)
    keys = set(record)
    if {"model_a", "model_b", "winner", "conversation_a", "conversation_b"} <= keys:
        return "arena"
    if {"history", "human_ref_A", "human_ref_B", "labels"} <= keys:
        return "shp"
    if {"chosen", "rejected"} <= keys:
        chosen = record["chosen"]
        if isinstance(chosen, str) and ("\n\nHuman:" in chosen or chosen.startswith("Human:")):
            return "hh"
        if isinstance(chosen, list) and {"score_chosen", "score_rejected"} <= keys:
            return "ultrafeedback"
        return "trl"
    if keys & {*PROMPT_KEYS, "messages"}:
        return "csv" if path.suffix.lower() == ".csv" else "prompts"
    found = ", ".join(map(str, record)) or "(none)"
    raise ImportFailed(path, f"unknown shape: columns found: {found}; formats known: {KNOWN_SHAPES}", where)


# ---- parsers: one record to one Item -------------------------------------------------------------------------
def parse_prompt(record: str | dict) -> Item:
    """A prompt-list record: a text line, a prompt-like column, or a chat `messages` list."""
    if isinstance(record, str):
        return Item("", canonical_messages(record))
    if not isinstance(record, dict):
        raise ValueError(f"a prompt row must be a line of text or an object, found {type(record).__name__}")
    messages = record.get("messages")
    if messages not in (None, "", []):
        history = _messages(messages, "messages")
        while history and history[-1]["role"] == "assistant":  # a whole chat: the prompt is up to the last question
            history.pop()
        return Item("", _prompt(history, "messages"))
    for key in PROMPT_KEYS:
        value = record.get(key)
        if value not in (None, ""):
            for more in ("input", "context") if key == "instruction" else ():  # Alpaca's input, Dolly's context
                if isinstance(record.get(more), str) and record[more].strip():
                    value = f"{value}\n\n{record[more]}"  # follows the instruction
            return Item("", _prompt(value, key))
    raise ValueError(f"no prompt: one of the columns {', '.join([*PROMPT_KEYS, 'messages'])} must hold text")


def parse_trl(record: dict, fmt: str = "trl") -> Item:
    """TRL preference rows: standard (strings) or conversational, explicit prompt or implicit (shared prefix)."""
    chosen, rejected = _need(record, fmt, "chosen", "rejected")
    prompt = record.get("prompt")
    # explicit: a prompt and answers alone; a chat prompt may come with plain text answers (they are its reply), but
    # a text prompt with chat answers means whole conversations (implicit prompt), as TRL reads them
    explicit = prompt not in (None, "", []) and (isinstance(prompt, list) or not isinstance(chosen, list))
    if explicit:
        messages = _prompt(prompt, "prompt")
        answers = (_answer(chosen, "chosen"), []), (_answer(rejected, "rejected"), [])
        if answers[0][0] == answers[1][0]:  # as the implicit form (_split_text) refuses it: no preference to learn
            raise ValueError("'chosen' and 'rejected' are the same text")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        messages, answers = _split_text(chosen, rejected)
    else:
        messages, answers = _split_chats(_messages(chosen, "chosen"), _messages(rejected, "rejected"))
    return _chosen_wins(messages, answers, fmt)


def parse_ultrafeedback(record: dict) -> Item:
    """Binarized UltraFeedback: trl rows with both scores; equal scores are a tie, not a win for the chosen side."""
    item = parse_trl(record, "ultrafeedback")
    scores = _plain(record, "score_chosen", "score_rejected")
    item.answers = tuple(
        Answer(a.text, a.model_name, {**a.params, "score": scores.get(key)})
        for a, key in zip(item.answers, ("score_chosen", "score_rejected"), strict=True)
    )
    numbers = [scores.get(key) for key in ("score_chosen", "score_rejected")]
    if all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers) and numbers[0] == numbers[1]:
        item.choice = "tie"  # (a "nan" score is kept as text: never equal here)
    return item


def parse_hh(record: dict) -> Item:
    """Anthropic HH-RLHF: two transcripts sharing every turn but the last assistant answer."""
    chosen, rejected = _need(record, "hh", "chosen", "rejected")
    messages, answers = _split_chats(_hh_messages(chosen, "chosen"), _hh_messages(rejected, "rejected"))
    return _chosen_wins(messages, answers, "hh")


def parse_arena(record: dict) -> Item:
    """Chatbot Arena: the model names and the judge are kept; ties and both-bad keep their choice."""
    model_a, model_b, winner, conv_a, conv_b = _need(
        record, "arena", "model_a", "model_b", "winner", "conversation_a", "conversation_b"
    )
    if winner not in ARENA_CHOICES:
        raise ValueError(f"field 'winner' is {winner!r}; expected one of {', '.join(ARENA_CHOICES)}")
    for name, value in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"field {name!r} must name a model")
    messages, answers = _split_chats(_messages(conv_a, "conversation_a"), _messages(conv_b, "conversation_b"))
    judge = record.get("judge")
    extra = _plain(record, "question_id", "tstamp", "language")
    pair = tuple(
        Answer(text, name, {**extra, **({"continuation": rest} if rest else {})})
        for (text, rest), name in zip(answers, (model_a, model_b), strict=True)
    )
    annotator = judge.strip() if isinstance(judge, str) and judge.strip() else "import:arena"
    return Item("", messages, pair, ARENA_CHOICES[winner], annotator)


def parse_shp(record: dict) -> Item:
    """Stanford SHP: `labels` 1 means human_ref_A was preferred, 0 means human_ref_B."""
    history, ref_a, ref_b, label = _need(record, "shp", "history", "human_ref_A", "human_ref_B", "labels")
    if str(label).strip() not in ("0", "1", "True", "False"):
        raise ValueError(f"field 'labels' is {label!r}; expected 1 (A preferred) or 0 (B preferred)")
    choice = "A" if str(label).strip() in ("1", "True") else "B"
    extra = _plain(record, "post_id", "domain")
    pair = tuple(
        Answer(_answer(text, name), f"import:{name}", {**extra, **_plain(record, score)})
        for text, name, score in ((ref_a, "human_ref_A", "score_A"), (ref_b, "human_ref_B", "score_B"))
    )
    return Item("", _prompt(history, "history"), pair, choice, "import:shp")


PARSERS = {
    "txt": parse_prompt,
    "csv": parse_prompt,
    "prompts": parse_prompt,
    "trl": parse_trl,
    "hh": parse_hh,
    "ultrafeedback": parse_ultrafeedback,
    "arena": parse_arena,
    "shp": parse_shp,
}


# ---- parser helpers ----------------------------------------------------------------------------------------
def _need(record: dict, fmt: str, *keys: str) -> list:
    missing = [key for key in keys if key not in record]
    if missing:
        found = ", ".join(map(str, record)) or "(none)"
        raise ValueError(f"missing column {', '.join(map(repr, missing))} for format {fmt} (columns found: {found})")
    empty = [key for key in keys if record[key] is None]
    if empty:
        names = ", ".join(map(repr, empty))
        raise ValueError(f"column {names} {'is' if len(empty) == 1 else 'are'} empty (null) for format {fmt}")
    return [record[key] for key in keys]


def _plain(record: dict, *keys: str) -> dict:
    """The given columns that are present, as JSON-safe values (for a generation's params)."""
    plain = {}
    for key in keys:
        value = record.get(key)
        if value is not None:
            plain[key] = value if isinstance(value, str | int | float | bool) else str(value)
            if isinstance(value, float) and not math.isfinite(value):
                plain[key] = str(value)  # "nan", "inf": JSON has no NaN, and PostgreSQL refuses the row without it
    return plain


def _prompt(value: Any, name: str) -> list[dict]:
    try:
        return canonical_messages(value)
    except ValueError as exc:
        raise ValueError(f"field {name!r}: {exc}") from None


def _messages(value: Any, name: str) -> list[dict]:
    """A chat message list (any roles order); each message keeps only role and content."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {name!r} must be a non-empty list of chat messages")
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"field {name!r}, message {i}: needs a role among system, user, assistant")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"field {name!r}, message {i}: has no text content")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _answer(value: Any, name: str) -> str:
    """An answer given on its own: a string, or a list holding one assistant message."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
            return value[0]["content"]
    if isinstance(value, str):
        return value
    raise ValueError(f"field {name!r} must be a text or one assistant message")


def _hh_messages(transcript: Any, name: str) -> list[dict]:
    if not isinstance(transcript, str):
        raise ValueError(f"field {name!r} must be a 'Human: … Assistant: …' transcript")
    text = "\n\n" + transcript if transcript.startswith(("Human:", "Assistant:")) else transcript
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"field {name!r} must be a transcript of '\\n\\nHuman: …\\n\\nAssistant: …' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def _split_text(chosen: str, rejected: str) -> tuple[list[dict], tuple]:
    """Standard implicit prompt: the shared character prefix (as TRL's extract_prompt cuts it)."""
    size = 0
    while size < min(len(chosen), len(rejected)) and chosen[size] == rejected[size]:
        size += 1
    if size and chosen[size - 1] == " ":  # the space before the answer goes with the answer
        size -= 1
    if not chosen[:size].strip():
        raise ValueError("no 'prompt' column and 'chosen' and 'rejected' share no prompt text")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same text")
    return _prompt(chosen[:size], "prompt"), ((chosen[size:], []), (rejected[size:], []))


def _split_chats(first: list[dict], second: list[dict]) -> tuple[list[dict], tuple]:
    """Two conversations sharing a history: the prompt is the shared prefix, each answer the next assistant turn.

    Later turns (multi-turn Arena) are kept in the answer's params as "continuation".
    """
    size = 0
    while size < min(len(first), len(second)) and first[size] == second[size]:
        size += 1
    if size == len(first) == len(second):
        raise ValueError("the two conversations are identical")
    prompt = _prompt(first[:size], "prompt") if size else None
    if prompt is None:
        raise ValueError("the two conversations share no prompt (their first messages differ)")
    answers = []
    for rest in (first[size:], second[size:]):
        if not rest or rest[0]["role"] != "assistant":
            raise ValueError("after the shared prompt each conversation must go on with an assistant answer")
        answers.append((rest[0]["content"], rest[1:]))
    return prompt, tuple(answers)


def _chosen_wins(messages: list[dict], answers: tuple, fmt: str) -> Item:
    """Chosen on side A, rejected on side B, choice A."""
    pair = tuple(
        Answer(text, f"import:{side}", {"continuation": rest} if rest else {})
        for (text, rest), side in zip(answers, ("chosen", "rejected"), strict=True)
    )
    return Item("", messages, pair, "A", f"import:{fmt}")

"""Simulated annotators for bench/loop.py: a taste is one consistent, checkable preference about an answer.

A taste judges a pair: the side that has the property wins; both or neither → a tie (or 'both_bad' when asked).
Each rule was tuned so that it holds for 30–70 % of the bundled model's own answers (a taste that almost always or
almost never holds gives no usable votes, and a win-rate against it measures nothing); `python bench/loop.py
--shares` measures that share on fresh answers and prints it. No taste holds for a degenerate answer (under 10
words, or looping): an annotator who likes lists does not prefer a list that loops.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

LIST_ITEM = re.compile(r"(?m)^\s*(?:\*\*)?(?:\d{1,2}[.)]|[-*•])\s+\S")
FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n")
EXAMPLE_WORDS = re.compile(
    r"\b(?:examples?|for instance|e\.g\.|such as|including|(?<!would )(?<!'d )(?<!feel )(?<!look )like)\b", re.I
)
PREAMBLE = re.compile(r"^(?:sure|certainly|of course|absolutely|great|okay|ok|yes|hello|hi)\b", re.I)


def words(text: str) -> list[str]:
    return text.split()


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def is_structured(text: str) -> bool:
    """Laid out in parts: a list (at least two numbered or bulleted items) or at least three paragraphs.

    A numbered list alone (the issue's first example) holds for only ~11 % of the bundled model's answers to the
    seed prompts, too rare to measure anything: bulleted lists and paragraphs count as structure too."""
    return len(LIST_ITEM.findall(text)) >= 2 or len(paragraphs(text)) >= 3


def opens_with_summary(text: str) -> bool:
    """The first sentence is a one-line summary: at most 15 words, not a preamble ("Sure!", "Certainly"), and the
    answer goes on after it (at least five more words) — the answer first, then the details."""
    first = FIRST_SENTENCE.split(text.strip(), maxsplit=1)[0].strip().lstrip("#*> ").strip()
    if not first or PREAMBLE.match(first) or LIST_ITEM.match(first):
        return False
    return len(words(first)) <= 15 and len(words(text)) >= len(words(first)) + 5


def gives_example(text: str) -> bool:
    """Names an example: "for example", "for instance", "e.g.", "such as", "including", "like …" (not "would
    like"), "an example"."""
    return EXAMPLE_WORDS.search(text) is not None


@dataclass(frozen=True)
class Taste:
    """`has` is the property; `holds` is what the annotator sees: the property in an answer that is not degenerate.

    A looping answer split into paragraphs is "structured", and one that loops after "for example" gives an example,
    but nobody who likes lists or examples prefers it: with `has` alone the list taste chose 3 looping answers over
    clean ones among its 17 decisive pairs (and never the reverse), and training learned to loop (bench/README.md).
    """

    name: str
    description: str
    has: Callable[[str], bool]

    def holds(self, text: str) -> bool:
        return self.has(text) and not is_degenerate(text)

    def judge(self, answer_a: str, answer_b: str, neither: str = "tie") -> str:
        """'A' or 'B' when exactly one side has the property; 'tie' when both have it; `neither` when none does."""
        a, b = self.holds(answer_a), self.holds(answer_b)
        if a != b:
            return "A" if a else "B"
        return "tie" if a else neither


TASTES = {
    "list": Taste("list", "prefers answers laid out as a list or in paragraphs", is_structured),
    "summary": Taste("summary", "prefers answers that open with a one-line summary", opens_with_summary),
    "example": Taste("example", "prefers answers that give an example", gives_example),
}


def _tokens(text: str) -> list[str]:
    return [w.lower().strip(".,;:!?*\"'()[]") for w in words(text)]


def is_looping(text: str) -> bool:
    """Looping on a repeated phrase: a phrase said three times back to back (one word: four times), or a third of
    the answer's 5-word runs said before. A reused phrase here and there (a small model's verbal tic) is not a loop."""
    tokens = _tokens(text)
    for n in range(1, 16):
        times = 4 if n == 1 else 3
        for i in range(len(tokens) - times * n + 1):
            if all(tokens[i : i + n] == tokens[i + k * n : i + (k + 1) * n] for k in range(1, times)):
                return True
    grams = [tuple(tokens[i : i + 5]) for i in range(len(tokens) - 4)]
    return bool(grams) and 1 - len(set(grams)) / len(grams) >= 0.3


def is_degenerate(text: str) -> bool:
    """Under 10 words, or looping on a repeated phrase."""
    return len(words(text)) < 10 or is_looping(text)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (0, 1 for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)

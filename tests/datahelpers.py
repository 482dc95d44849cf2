"""Preference data written through the real store: a clear rule (polite, complete answers beat curt ones)."""

from __future__ import annotations

import json
from pathlib import Path

TOPICS = ["rivers", "tea", "bicycles", "the moon", "bread", "owls", "rain", "chess", "maps", "music",
          "glass", "trees", "clocks", "salt", "bridges", "snow", "honey", "trains", "paper", "stars"]  # fmt: skip


def seed_preferences(store, n: int = 40, annotator: str = "tester") -> list[int]:
    """n comparisons on n prompts; the chosen side is a friendly full sentence, the other a curt reply."""
    ids = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = store.add_prompt([{"role": "user", "content": f"Tell me one fact about {topic} (#{i})."}], "test")
        good = store.add_generation(
            prompt, f"Happy to help! Here is a fact about {topic}: it has a long and interesting history.",
            model_version_id=0, params={"seed": i},
        )  # fmt: skip
        bad = store.add_generation(prompt, "No.", model_version_id=0, params={"seed": i + 1000})
        a, b, choice = (good, bad, "A") if i % 2 == 0 else (bad, good, "B")
        ids.append(store.add_comparison(prompt_id=prompt, generation_a=a, generation_b=b, annotator=annotator,
                                        choice=choice, source="test"))  # fmt: skip
    return ids


# Settings of a training run on the tiny model that take a few seconds: two steps, and a one-prompt, 8-token
# before/after panel (the default 4 prompts x 128 tokens adds ~5 s to every run; the panel's tests set their own).
QUICK_RUN = {
    "max_steps": 2, "batch_size": 2, "max_length": 64, "before_after_prompts": 1, "before_after_max_new_tokens": 8,
}  # fmt: skip
MARKDOWN_BAIT = "[click](https://example.com/go) ![p](https://example.com/p.png) <b>bold</b> **loud**"


def markdown_battle_file(folder: Path) -> Path:
    """An arena battle file the importer refuses, quoting its bad winner field: Markdown and a tag that the page
    must show as text."""
    battle = {
        "question_id": "q1",
        "model_a": "m1",
        "model_b": "m2",
        "winner": MARKDOWN_BAIT,
        "judge": "j",
        "conversation_a": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "conversation_b": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey."}],
    }
    path = folder / "battles.jsonl"
    path.write_text(json.dumps(battle) + "\n", encoding="utf-8")
    return path

"""Try a training recipe on votes already cast: rebuild the rows from a bench/loop.py database, train, judge.

    python bench/recipes.py TASTE RECIPE SRC [KEY=VALUE ...]      # RECIPE: sft | dpo | kto
    e.g. python bench/recipes.py summary dpo /tmp/prefloop-loop learning_rate=1e-3 max_length=640

SRC/TASTE/app.duckdb holds the pairs a loop run labelled (bench/loop.py). Each pair is judged again by the taste as
an annotator who says "both bad" when neither side has the property (bench/tastes.py), and turned into the
recipe's rows: sft = every answer with the property; dpo = the decisive pairs; kto = every answer, labelled.
`python -m training RECIPE` trains on them (KEY=VALUE: any training setting), then the new adapter answers the
held-out prompts with bench/loop.py's seeds, judged against the parent's answers cached in SRC by bench/loop.py
(with --repetition-penalty X: the parent answers of that penalty, made here when missing). One JSON line each,
appended to WORK/results.jsonl. Faster than a loop run (no labeling, no app), but not the Train tab's path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.chdir(REPO)

from bench.heldout import answer, judge, parent_answers, prompt_split  # noqa: E402
from bench.tastes import TASTES, Taste  # noqa: E402


def labelled_pairs(db: Path) -> list[tuple[list[dict], str, str]]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT p.messages, ga.text, gb.text FROM effective_comparisons c JOIN prompts p ON p.id = c.prompt_id "
            "JOIN generations ga ON ga.id = c.generation_a JOIN generations gb ON gb.id = c.generation_b ORDER BY c.id"
        ).fetchall()
    return [(json.loads(m) if isinstance(m, str) else m, a, b) for m, a, b in rows]


def recipe_rows(recipe: str, taste: Taste, pairs) -> list[dict]:
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = []
    for messages, a, b in pairs:
        has = {a: taste.holds(a), b: taste.holds(b)}
        if recipe == "sft":
            rows += [{"prompt": messages, "completion": reply(t)} for t, ok in has.items() if ok]
        elif recipe == "dpo" and has[a] != has[b]:
            good, bad = (a, b) if has[a] else (b, a)
            rows.append({"prompt": messages, "chosen": reply(good), "rejected": reply(bad)})
        elif recipe == "kto":
            rows += [{"prompt": messages, "completion": reply(t), "label": ok} for t, ok in has.items()]
    unique = {json.dumps(r, sort_keys=True): r for r in rows}
    return list(unique.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("taste", choices=list(TASTES))
    parser.add_argument("recipe", choices=("sft", "dpo", "kto"))
    parser.add_argument("src", type=Path, help="a bench/loop.py --work folder")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prefloop-recipes"))
    args = parser.parse_args()
    taste, penalty = TASTES[args.taste], args.repetition_penalty
    name = "-".join([args.taste, args.recipe, f"rp{penalty}", *args.settings]).replace("=", "")
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    rows = recipe_rows(args.recipe, taste, labelled_pairs(args.src / args.taste / "app.duckdb"))
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [x for kv in args.settings for x in ("--" + kv.split("=", 1)[0].replace("_", "-"), kv.split("=", 1)[1])]
    started = time.monotonic()
    with (work / "train.log").open("w") as log:
        command = [sys.executable, "-m", "training", args.recipe, "--data", str(data), "--out", str(work / "run")]
        subprocess.run([*command, "--before-after-prompts", "0", *flags], check=True, stdout=log, stderr=log)
    train_seconds = time.monotonic() - started

    from generation.engine import GenerationEngine

    _, heldout = prompt_split(32)
    sampling = (heldout, 2, 0.7, 512, penalty)
    engine = GenerationEngine("bundled", threads=os.cpu_count())
    parent, _ = parent_answers(args.src, engine, *sampling)  # cached in SRC as bench/loop.py caches it
    engine.load_version(1, work / "run" / "adapter")
    started = time.monotonic()
    new = answer(engine, 1, *sampling)
    engine.close()
    result = {
        "taste": args.taste, "recipe": args.recipe, "settings": args.settings, "repetition_penalty": penalty,
        "rows": len(rows), "train_seconds": round(train_seconds), "answer_seconds": round(time.monotonic() - started),
        **judge(taste, parent, new),
    }  # fmt: skip
    (work / "new.json").write_text(json.dumps(new))
    print(json.dumps(result), flush=True)
    with (args.work / "results.jsonl").open("a") as out:
        out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""More training pairs from the same votes? Two pairs per prompt, and preferences across a prompt's pairs.

    python bench/crosspairs.py TASTE SRC [--mode cross|votes] [--prompts 32] [KEY=VALUE ...]

64 votes as bench/loop.py casts them, but on 32 labeling prompts with two pairs each (four answers per prompt: the
pair queue's cool and hot temperatures, twice). The taste votes each pair as loop's annotator does (A / B, tie
when both sides have the property, both bad when neither does). Training rows:
- `votes`: the decisive votes, winner over loser (what the DPO default trains on today);
- `cross`: every (good, bad) couple of one prompt's four answers, where good = won a vote or was in a tie and bad =
  lost a vote or was in a both-bad vote — for this annotator, the answers with and without the property. A tie on
  one pair and a both-bad on the other pair of the same prompt then give four pairs where the votes gave none.
`python -m training dpo` trains on them (KEY=VALUE: any setting), and the new adapter answers bench/loop.py's
held-out prompts, judged against the parent answers cached in SRC (a bench/loop.py --work folder; penalty 1.1).
One JSON line, appended to WORK/results.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
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
from bench.tastes import TASTES  # noqa: E402

PENALTY, MAX_NEW = 1.1, 512  # the app's labeling defaults


def four_answers(engine, prompts: list[str]) -> list[list[str]]:
    from generation.sampling import SamplingParams
    from labeling.pair_queue import SELF_TEMPERATURES

    requests = [
        ([{"role": "user", "content": p}], SamplingParams(temperature=SELF_TEMPERATURES[j % 2], max_new_tokens=MAX_NEW,
                                                          seed=90_000 + 10 * i + j, repetition_penalty=PENALTY), 0)
        for i, p in enumerate(prompts)
        for j in range(4)
    ]  # fmt: skip
    texts = [f.result().text for f in engine.submit_many(requests)]
    return [texts[k : k + 4] for k in range(0, len(texts), 4)]


def training_rows(taste, prompts: list[str], groups: list[list[str]], mode: str) -> tuple[list[dict], dict]:
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows, votes = [], {"A": 0, "B": 0, "tie": 0, "both_bad": 0}
    for prompt, texts in zip(prompts, groups, strict=True):
        good, bad = set(), set()
        for a, b in ((texts[0], texts[1]), (texts[2], texts[3])):
            vote = taste.judge(a, b, neither="both_bad")
            votes[vote] += 1
            if vote in ("A", "B"):
                winner, loser = (a, b) if vote == "A" else (b, a)
                good.add(winner), bad.add(loser)
                if mode == "votes":
                    rows.append((prompt, winner, loser))
            else:
                (good if vote == "tie" else bad).update((a, b))
        if mode == "cross":
            rows += [(prompt, g, b) for g, b in itertools.product(sorted(good), sorted(bad)) if g.strip() != b.strip()]
    out = [{"prompt": [{"role": "user", "content": p}], "chosen": reply(g), "rejected": reply(b)} for p, g, b in rows]
    return out, votes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("taste", choices=list(TASTES))
    parser.add_argument("src", type=Path, help="a bench/loop.py --work folder (its cached parent answers)")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--mode", choices=("cross", "votes"), default="cross")
    parser.add_argument("--prompts", type=int, default=32, help="labeling prompts, two votes each")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prefloop-crosspairs"))
    args = parser.parse_args()
    from generation.engine import GenerationEngine

    taste, (labeling, heldout) = TASTES[args.taste], prompt_split(32)
    work = args.work / "-".join([args.taste, args.mode, *args.settings]).replace("=", "")
    work.mkdir(parents=True, exist_ok=True)
    cache = args.work / f"answers-{args.prompts}x4.json"
    engine = GenerationEngine("bundled", threads=os.cpu_count())
    started = time.monotonic()
    if not cache.is_file():
        cache.write_text(json.dumps(four_answers(engine, labeling[: args.prompts])))
    label_seconds = time.monotonic() - started
    rows, votes = training_rows(taste, labeling[: args.prompts], json.loads(cache.read_text()), args.mode)
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [x for kv in args.settings for x in ("--" + kv.split("=", 1)[0].replace("_", "-"), kv.split("=", 1)[1])]
    started = time.monotonic()
    with (work / "train.log").open("w") as log:
        command = [sys.executable, "-m", "training", "dpo", "--data", str(work / "data.jsonl"), "--out"]
        subprocess.run([*command, str(work / "run"), "--before-after-prompts", "0", *flags], check=True, stdout=log,
                       stderr=log)  # fmt: skip
    train_seconds = time.monotonic() - started
    sampling = (heldout, 2, 0.7, MAX_NEW, PENALTY)
    parent, _ = parent_answers(args.src, engine, *sampling)
    engine.load_version(1, work / "run" / "adapter")
    new = answer(engine, 1, *sampling)
    engine.close()
    result = {"taste": args.taste, "mode": args.mode, "settings": args.settings, "votes": votes, "rows": len(rows),
              "label_seconds": round(label_seconds), "train_seconds": round(train_seconds),
              **judge(taste, parent, new)}  # fmt: skip
    print(json.dumps(result), flush=True)
    with (args.work / "results.jsonl").open("a") as out:
        out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

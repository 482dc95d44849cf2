"""Does the loop move the model the way the labels point? Simulated annotators vote, one run trains, a taste judges.

    python bench/loop.py [--tastes list,summary,example] [--votes 64] [--heldout 32] [--max-new-tokens N]
                         [--method dpo] [--lr X] [--epochs X] [--beta X] [--set key=value ...] [--reuse]
    python bench/loop.py --shares [--samples 2]     # only: how often each taste holds for the model's own answers

Per taste, on a fresh database (WORK/TASTE/app.duckdb):
1. label: the app starts in-process with the bundled model (as tests/apphelpers.py `running_app` does, 'self' pairs
   only) and a simulated annotator votes `--votes` pairs through the public API (gradio_client `/next_pair` and
   `/vote`); its taste decides A / B / tie (bench/tastes.py).
2. train: one run through the runner the Train tab uses, `services.runner.submit(method, overrides,
   parent_version=<serving>)`, with no overrides unless given: the time is from that call to the registered version.
3. judge: the new version and its parent answer the held-out prompts with the same seeds (`--samples` per prompt)
   in the app's engine; the same taste judges each (new, parent) pair. Win-rate = wins / (wins + losses), ties
   (the taste cannot tell the two apart, e.g. identical answers) left out, with a 95 % Wilson interval; ties
   counted as half a win are printed too.

The held-out prompts (never voted on), their answers and the verdict: bench/heldout.py.
`--reuse` keeps a database that already holds the votes (train and judge again with other settings); the parent's
held-out answers are cached in WORK (the parent is the base model for every taste).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
for key, value in {**ENVIRONMENT, "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.chdir(REPO)

from bench.heldout import answer, judge, parent_answers, prompt_split  # noqa: E402
from bench.tastes import TASTES, Taste, is_degenerate  # noqa: E402


# ---- the app, in-process -------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_app(work: Path, prompts: list[str], max_new_tokens: int, queue_size: int, penalty: float):
    """The real app (store, engine, pair queue, runner, Gradio server) on WORK/app.duckdb; yields (url, services)."""
    import app as prefloop_app
    from storage.db import Store
    from tests.apphelpers import free_port, wait_for
    from ui.app import build_app

    db = work / "app.duckdb"
    if not db.exists():  # the app imports the seed prompts only into an empty database: give it the labeling ones
        store = Store(db)
        for text in prompts:
            store.add_prompt([{"role": "user", "content": text}], "seed")
        store.close()
    port = free_port()
    args = prefloop_app.parse_args(
        [
            "--db",
            str(db),
            "--port",
            str(port),
            "--runs-dir",
            str(work / "runs"),
            "--queue-size",
            str(queue_size),
            "--max-new-tokens",
            str(max_new_tokens),
            "--strategy",
            "self",
            "--repetition-penalty",
            str(penalty),
        ]
    )
    access = prefloop_app.load_access(args)
    services = prefloop_app.create_services(args)
    demo = build_app(services, access, upload_max_rows=args.upload_max_rows)
    try:
        options = {**prefloop_app.launch_options(args, access), "server_name": "127.0.0.1"}
        demo.queue(default_concurrency_limit=8, max_size=args.queue_max).launch(
            prevent_thread_lock=True, quiet=True, **options
        )
        if queue_size:
            wait_for(lambda: services.queue.depth() >= 1, 600, "the first pair")
        yield f"http://127.0.0.1:{port}/", services
    finally:
        demo.close()
        services.queue.stop()
        if getattr(services, "arena", None) is not None:
            services.arena.stop()
        services.runner.stop(cancel_running=True)
        services.engine.close()
        services.store.close()


def votes_cast(services, annotator: str) -> int:
    with services.store.read() as cur:
        return cur.execute("SELECT count(*) FROM effective_comparisons WHERE annotator = ?", [annotator]).fetchone()[0]


def label(url: str, taste: Taste, votes: int, neither: str) -> dict:
    """The simulated annotator votes `votes` pairs through /next_pair and /vote; returns counts, time and answers."""
    from gradio_client import Client

    client, name = Client(url, verbose=False), f"taste-{taste.name}"
    choices, answers, started = Counter(), [], time.monotonic()
    while sum(choices.values()) < votes:
        pair_id, _prompt, answer_a, answer_b = client.predict(name, api_name="/next_pair")
        if pair_id is None:
            time.sleep(0.5)  # the queue is refilling
            continue
        choice = taste.judge(answer_a, answer_b, neither)
        assert client.predict(pair_id, name, choice, "", "", api_name="/vote") == "ok"
        choices[choice] += 1
        answers += [answer_a, answer_b]
    return {"seconds": round(time.monotonic() - started, 1), "choices": dict(choices), "answers": answers}


def settle(services, timeout: float = 600) -> float:
    """Wait until the pair queue has stopped generating (its refill after the last votes); returns seconds waited."""
    started = time.monotonic()
    while services.queue.progress()["generating"] and time.monotonic() - started < timeout:
        time.sleep(1)
    return round(time.monotonic() - started, 1)


RUNNER_KEYS = {"data", "out", "base_model", "model_cache", "base_version", "init_adapter", "prompts", "score_data"}


def finished_run(services, method: str, overrides: dict) -> tuple[object, float] | None:
    """With --reuse: a run of this method and these settings that already succeeded (the bench was stopped after
    it), as (RunStatus, seconds from submit to end), so only the judging is done again."""
    for row in services.runner.runs(limit=100):
        status = services.runner.status(row["id"])
        settings = {k: v for k, v in status.config.items() if k not in RUNNER_KEYS}
        if status.status == "succeeded" and status.method == method and settings == overrides:
            return status, round((row["finished_at"] - row["created_at"]).total_seconds(), 1)
    return None


def train(services, method: str, overrides: dict, timeout: float) -> tuple[object, float]:
    """One press of Start: the Train tab's runner, on top of the serving version. Returns (RunStatus, seconds)."""
    started = time.monotonic()
    run_id = services.runner.submit(method, dict(overrides), parent_version=services.engine.active_version)
    status = services.runner.wait(run_id, timeout=timeout)
    return status, round(time.monotonic() - started, 1)


# ---- one taste, end to end -------------------------------------------------------------------------------------
def run_taste(taste: Taste, args, overrides: dict) -> dict:
    work = Path(args.work) / taste.name
    labeling, heldout = prompt_split(args.heldout)
    if work.exists() and not args.reuse:
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "taste": taste.name,
        "method": args.method,
        "overrides": overrides,
        "votes": args.votes,
        "max_new_tokens": args.max_new_tokens,
        "heldout": len(heldout),
        "samples": args.samples,
        "repetition_penalty": args.repetition_penalty,
        "neither": args.neither,
    }
    labeled = args.reuse and (work / "labels.json").is_file()  # no new pairs needed: the queue stays idle
    queue_size = 0 if labeled else args.queue_size
    with running_app(work, labeling, args.max_new_tokens, queue_size, args.repetition_penalty) as (url, services):
        annotator = f"taste-{taste.name}"
        if votes_cast(services, annotator) >= args.votes:
            labels = json.loads((work / "labels.json").read_text())
            print(f"[{taste.name}] reusing {votes_cast(services, annotator)} votes in {work}", flush=True)
        else:
            print(f"[{taste.name}] labeling {args.votes} pairs ({taste.description})", flush=True)
            labels = label(url, taste, args.votes, args.neither)
            (work / "labels.json").write_text(json.dumps(labels))
        answers = labels["answers"]
        result["label_seconds"] = labels["seconds"]
        result["choices"] = labels["choices"]
        result["share_in_labeled_answers"] = round(sum(map(taste.holds, answers)) / len(answers), 3)
        result["settle_seconds"] = settle(services)
        held = 100 * result["share_in_labeled_answers"]
        print(
            f"[{taste.name}] votes {labels['choices']} in {labels['seconds']} s; taste holds for {held:.0f} % "
            "of the labeled answers; training",
            flush=True,
        )
        from training.runner import RunRejected

        try:
            done = finished_run(services, args.method, overrides) if args.reuse else None
            status, seconds = done or train(services, args.method, overrides, args.timeout)
        except RunRejected as exc:
            print(f"[{taste.name}] not trained: {exc}", flush=True)
            return {**result, "run_status": f"rejected: {exc}"}
        result.update(
            run_id=status.id,
            run_status=status.status,
            trained_method=status.method,
            train_seconds=seconds,
            steps=status.metrics.get("steps"),
            reward_accuracy=status.metrics.get("reward_accuracy"),
            message=status.message,
        )
        panel = (status.metrics or {}).get("before_after") or {}
        result["kl"] = panel.get("kl_to_parent")
        if status.status != "succeeded":
            print(f"[{taste.name}] run {status.id} {status.status}: {status.error}", flush=True)
            return result
        version = services.store.get_version(status.result_version)
        services.engine.load_version(version["id"], version["adapter_path"])
        sampling = (heldout, args.samples, args.temperature, args.max_new_tokens, args.repetition_penalty)
        parent, result["parent_answer_seconds"] = parent_answers(Path(args.work), services.engine, *sampling)
        started, saved = time.monotonic(), work / f"heldout-run{status.id}.json"
        if saved.is_file():  # judged before: the same seeds give the same answers
            new = [{"text": x["new"], "truncated": x["new_truncated"]} for x in json.loads(saved.read_text())]
        else:
            new = answer(services.engine, version["id"], *sampling)
        result["new_answer_seconds"] = round(time.monotonic() - started, 1)
        result.update(judge(taste, parent, new))
        (work / f"heldout-run{status.id}.json").write_text(
            json.dumps(
                [
                    {
                        "prompt": heldout[i // args.samples],
                        "parent": p["text"],
                        "new": n["text"],
                        "new_truncated": n["truncated"],
                    }
                    for i, (p, n) in enumerate(zip(parent, new, strict=True))
                ],
                indent=1,
            )
        )
    return result


def row(r: dict) -> str:
    if r.get("run_status") != "succeeded":
        return f"| {r['taste']} | run {r.get('run_status')} | | | | | | |"
    kl = f"{r['kl']:.2f}" if isinstance(r.get("kl"), int | float) else "–"
    pct = lambda key: "–" if r[key] is None else f"{100 * r[key]:.0f}"  # noqa: E731
    return (
        f"| {r['taste']} | {pct('win_rate')} % [{100 * r['ci'][0]:.0f}, {100 * r['ci'][1]:.0f}] "
        f"({r['wins']}–{r['losses']}, {r['ties']} ties) | {pct('taste_before')} → {pct('taste_after')} % | "
        f"{pct('degenerate_before')} → {pct('degenerate_after')} % | {r['words_before']:.0f} → "
        f"{r['words_after']:.0f} | {pct('truncated_before')} → {pct('truncated_after')} % | {kl} | "
        f"{r['label_seconds']:.0f} s | {r['train_seconds']:.0f} s |"
    )


HEADER = (
    "| taste | win-rate [95 % CI] (W–L, ties) | taste holds before → after | degenerate | words | truncated "
    "| KL | label time | click → version |\n|---|---|---|---|---|---|---|---|---|"
)


# ---- --shares: how often does each taste hold? -------------------------------------------------------------------
def shares(args) -> None:
    from generation.engine import GenerationEngine
    from generation.sampling import SamplingParams
    from labeling.pair_queue import SELF_TEMPERATURES

    labeling, heldout = prompt_split(args.heldout)
    engine = GenerationEngine("bundled")
    requests = [
        (
            [{"role": "user", "content": p}],
            SamplingParams(
                temperature=t,
                max_new_tokens=args.max_new_tokens,
                seed=100 * i + j,
                repetition_penalty=args.repetition_penalty,
            ),
            0,
        )
        for i, p in enumerate(labeling)
        for j in range(args.samples)
        for t in SELF_TEMPERATURES
    ]
    started = time.monotonic()
    results = [f.result() for f in engine.submit_many(requests)]
    engine.close()
    texts = [r.text for r in results]
    lengths = sorted(r.token_count for r in results)
    cut = sum(r.finish_reason == "length" for r in results) / len(results)
    print(
        f"tokens: median {lengths[len(lengths) // 2]}, p90 {lengths[int(0.9 * len(lengths))]}; "
        f"{100 * cut:.1f} % cut at {args.max_new_tokens}"
    )
    out = Path(args.work) / f"shares-n{args.max_new_tokens}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(texts))
    print(f"{len(texts)} answers in {time.monotonic() - started:.0f} s (saved to {out})")
    print_shares(texts)


def print_shares(texts: list[str]) -> None:
    for taste in TASTES.values():
        share = sum(map(taste.holds, texts)) / len(texts)
        flag = "ok" if 0.3 <= share <= 0.7 else "OUT OF RANGE (30-70 %)"
        print(f"{taste.name:8s} holds for {100 * share:5.1f} % of {len(texts)} answers: {flag}")
    print(f"degenerate {100 * sum(map(is_degenerate, texts)) / len(texts):.1f} %")


def parse_overrides(args) -> dict:
    overrides = {}
    for name, value in (
        ("learning_rate", args.lr),
        ("epochs", args.epochs),
        ("beta", args.beta),
        ("max_steps", args.max_steps),
    ):
        if value is not None:
            overrides[name] = value
    import yaml

    for item in args.set or []:
        key, _, text = item.partition("=")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(text)
    return overrides


def main() -> None:
    import app as prefloop_app
    from training.datamix import DEFAULT_METHOD

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tastes", default="list,summary,example", help=f"comma-separated: {', '.join(TASTES)}")
    parser.add_argument("--votes", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32, help="held-out prompts")
    parser.add_argument("--samples", type=int, default=2, help="answers per held-out prompt and version (seeds)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=prefloop_app.parse_args([]).max_new_tokens,
        help="answer cap for labeling and judging (default: the app's)",
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the held-out answers")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=prefloop_app.parse_args([]).repetition_penalty,
        help="for labeling and judging (default: the app's)",
    )
    parser.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"training method as the Train tab submits it (default: {DEFAULT_METHOD})",
    )
    parser.add_argument("--lr", type=float, help="override: learning rate")
    parser.add_argument("--epochs", type=float, help="override: epochs")
    parser.add_argument("--beta", type=float, help="override: beta")
    parser.add_argument("--max-steps", type=int, help="override: optimizer steps")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other training setting (repeatable)")
    parser.add_argument(
        "--neither", choices=("tie", "both_bad"), default="both_bad", help="vote when neither side has the property"
    )
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a training run may take")
    parser.add_argument("--work", default="/tmp/prefloop-loop", help="databases, runs and results")
    parser.add_argument("--reuse", action="store_true", help="keep a database that already holds the votes")
    parser.add_argument("--shares", action="store_true", help="only measure how often each taste holds")
    parser.add_argument("--shares-file", help="print the shares of saved answers (a JSON list of texts)")
    args = parser.parse_args()
    if args.shares_file:
        return print_shares(json.loads(Path(args.shares_file).read_text()))
    if args.shares:
        return shares(args)
    overrides = parse_overrides(args)
    print(
        f"load average {os.getloadavg()[0]:.1f}; method {args.method}; overrides {overrides or 'none'}; "
        f"max_new_tokens {args.max_new_tokens}",
        flush=True,
    )
    results = []
    for name in args.tastes.split(","):
        result = run_taste(TASTES[name.strip()], args, overrides)
        result["load_average"] = round(os.getloadavg()[0], 1)
        results.append(result)
        print(json.dumps(result), flush=True)
        with (Path(args.work) / "results.jsonl").open("a") as out:
            out.write(json.dumps({**result, "time": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    print(HEADER)
    for result in results:
        print(row(result))


if __name__ == "__main__":
    main()

"""The same speed at a million judgements: every per-request cost measured on an empty store and on a big one.

    python bench/scale.py [--comparisons 1000000] [--quick] [--reuse BIG.duckdb] [--keep BIG.duckdb] [--json OUT]

The big store is built through the product's own importer (bench/scale_data.py: Arena-format parquet files of
100,000 rows, then a done pair per comparison and 1% of the judgements undone, as labelling leaves them); --reuse
copies an earlier build (--keep saves one). Both stores then get the same ready pairs and the same measurements:

- next_pair + vote: 16 caller threads lease and vote flat out through Services (server time, p50/p95), and the
  Label tab's vote handler (vote, next pair, counters, receipt) the same way; then again *paced* (`paced_*`):
  each caller waits a random 0-2 × --think-ms (default 500 ms, mean) between rounds, untimed — still ~20× the
  pace of a person, who reads two answers before voting — so the figure is the server's time for a request, not
  the queueing of 16 callers that never pause on 2 cores (flat out, p50 ≈ 16 × the cost of one round);
- Data tab refresh (DataHandlers.stats), Train tab overview (TrainHandlers.overview) and watch
  (TrainHandlers.watch of a running run with a 20,000-step progress file and a 20 MB log), each between votes;
- Store.stats() and `python -m storage stats` (a fresh process);
- reward scores for 100,000 generations saved (storage.scores.save_scores) while 16 callers vote: the longest
  vote wait, and writing the generations to score (what a reward run's submit does);
- DPO export (storage.exporters.export) rows/s; importing one more 100,000-row file, then one 500,000-row file
  (comparisons/s: `import_per_s`, `import_big_per_s`);
- app start to UI: `python app.py` on a tiny random Llama (cached), until its page answers.
Targets are printed next to each figure. --quick: 20,000 comparisons and shorter runs (checks the script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import scale_data  # noqa: E402
from scale_store import app_start, export_rate, import_rate, percentile, stats_cli, timed, tiny_model  # noqa: E402

TARGETS = {  # figure: (target, "max" or "min")
    "round_p95_ms": (50, "max"), "paced_round_p95_ms": (50, "max"), "click_p95_ms": (None, "max"),
    "data_tab_ms": (200, "max"),
    "overview_ms": (200, "max"), "watch_ms": (200, "max"), "stats_ms": (1000, "max"), "stats_cli_s": (1.0, "max"),
    "stats_cli_again_s": (1.0, "max"),
    "app_start_s": (15, "max"), "import_per_s": (50_000, "min"),
    "import_big_per_s": (50_000, "min"), "export_rows_per_s": (100_000, "min"),
    "score_lock_max_ms": (100, "max"), "round_p95_vs_empty": (1.5, "max"),
    "paced_round_p95_vs_empty": (1.5, "max"),
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comparisons", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="20,000 comparisons, short runs (checks the script)")
    parser.add_argument("--reuse", type=Path, help="copy this earlier build instead of importing anew")
    parser.add_argument("--keep", type=Path, help="save the freshly built big store here")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=25, help="votes per caller")
    parser.add_argument("--think-ms", type=float, default=500, help="paced: mean pause between votes")
    parser.add_argument("--scores", type=int, default=100_000, help="reward scores saved while people vote")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each tab handler (median)")
    parser.add_argument("--work", type=Path, help="folder for the stores (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        help="skip a part: app, cli, labeling (voting, tabs, scoring), scoring, export, import",
    )
    args = parser.parse_args()
    if args.quick:
        args.comparisons, args.rounds, args.scores = min(args.comparisons, 20_000), 10, 10_000
    return args


# ---- the services the handlers talk to -------------------------------------------------------------------------
class NoEngine:
    """What the handlers ask of an engine when nothing generates: the serving version."""

    active_version = 0
    max_batch = 8


def make_services(store, runs_dir: Path):
    from labeling.pair_queue import PairQueue
    from labeling.services import Services
    from training.runner import JobRunner

    queue = PairQueue(store, NoEngine())  # the refill thread is not started: leasing never touches the engine
    runner = JobRunner(store, runs_dir=runs_dir)
    return Services(store, NoEngine(), queue, runner)


def add_running_run(store, runs_dir: Path, steps: int, log_mb: int) -> int:
    """A run 'running' in this process (its pid is alive) with a long progress file and log, as watch sees one."""
    run_dir = runs_dir / "run-bench"
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "progress.jsonl").open("w") as out:
        out.write(json.dumps({"event": "start", "total": steps, "time": 0}) + "\n")
        for step in range(1, steps + 1):
            out.write(json.dumps({"event": "progress", "step": step, "total": steps, "epoch": step / steps,
                                  "loss": 0.7 - step / steps / 2, "learning_rate": 5e-5, "elapsed": step * 1.5,
                                  "eta": (steps - step) * 1.5, "reward_accuracy": 0.6, "reward_margin": 0.2,
                                  "time": step}) + "\n")  # fmt: skip
    line = "step 123/456 loss 0.6931 | a log line as trainers print them, with a little padding to be typical\n"
    (run_dir / "log.txt").write_text(line * (log_mb * 1_000_000 // len(line)))
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO training_runs (id, method, status, run_dir, pid, parent_version, snapshot_rows, config, "
            "started_at) VALUES (nextval('training_runs_id_seq'), 'dpo', 'running', ?, ?, 0, 0, '{}', now()) "
            "RETURNING id",
            [str(run_dir), os.getpid()],
        )
        return int(cur.fetchone()[0])


# ---- voting ------------------------------------------------------------------------------------------------------
def vote_rounds(services, callers: int, rounds: int, think_ms: float = 0.0) -> dict:
    """Each caller: next_pair + vote (Services) `rounds` times, then the Label tab's vote handler `rounds` times;
    with `think_ms`, a random pause of 0-2 × think_ms (untimed) before each round."""
    import random

    from labeling.access import Access, RateLimiter
    from ui.label_tab import LabelHandlers

    # The callers stand for 16 people on 16 machines; in one process they share one client address, whose rate limit
    # (20 requests/s) would refuse most clicks in a few seconds and time the refusals instead of the votes.
    label = LabelHandlers(services, Access(limiter=RateLimiter(rate=1e9, burst=1e9)))
    plain, clicks, errors = [], [], []
    start = threading.Barrier(callers)

    def caller(name: str) -> None:
        pause = random.Random(name).uniform
        try:
            start.wait()
            for _ in range(rounds):
                time.sleep(pause(0, 2 * think_ms) / 1000)
                began = time.perf_counter()
                pair = services.next_pair(name)
                if pair is None:
                    raise RuntimeError("the queue ran dry")
                services.vote(pair["pair_id"], name, "A", seconds=3.0)
                plain.append((time.perf_counter() - began) * 1000)
            current = label.show(name)[0]
            start.wait()
            for _ in range(rounds):
                time.sleep(pause(0, 2 * think_ms) / 1000)
                began = time.perf_counter()
                out = label.cast("B")(name, current, time.time() - 3, "", "", None)
                clicks.append((time.perf_counter() - began) * 1000)
                current = out[0]
                if not isinstance(current, str) or not current or out[-1].startswith("⚠️"):
                    raise RuntimeError(f"the click failed: {out[-1]}")
        except Exception as exc:
            errors.append(f"{name}: {exc!r}")
            start.abort()

    threads = [threading.Thread(target=caller, args=(f"annotator{i}",)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} callers failed, e.g. {errors[0]}")
    return {
        "round_p50_ms": percentile(plain, 50), "round_p95_ms": percentile(plain, 95),
        "click_p50_ms": percentile(clicks, 50), "click_p95_ms": percentile(clicks, 95),
    }  # fmt: skip


def refreshes(services, run_id: int, callers: int, repeats: int) -> dict:
    """Each tab handler timed `repeats` times, with a round of votes (one per caller) before each: the median."""
    from labeling.access import Access
    from ui.data_tab import DataHandlers
    from ui.train_tab import TrainHandlers

    data, train = DataHandlers(services, Access(), 1000), TrainHandlers(services, Access())
    calls = {"data_tab_ms": lambda: data.stats(None), "overview_ms": lambda: train.overview(None, None, None),
             "watch_ms": lambda: train.watch(run_id, None)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in calls}
    firsts = {}
    for repeat in range(repeats + 1):
        for i in range(callers):
            name = f"annotator{i}"
            pair = services.next_pair(name)
            services.vote(pair["pair_id"], name, "tie")
        for name, call in calls.items():
            seconds, _ = timed(call)
            (times[name].append(seconds * 1000) if repeat else firsts.__setitem__(name, seconds * 1000))
    figures = {name: statistics.median(values) for name, values in times.items()}
    figures.update({f"{name[:-3]}_first_ms": value for name, value in firsts.items()})
    return figures


def scoring_while_voting(services, callers: int, scores: int) -> dict:
    """Callers vote (and undo, to keep their pair) while reward scores for `scores` generations are saved."""
    from storage.scores import save_scores

    store = services.store
    version = store.add_version(kind="reward", base_model="bench", notes="bench reward model")
    with store.read() as cur:
        ids = [r[0] for r in cur.execute("SELECT id FROM generations ORDER BY id LIMIT ?", [scores]).fetchall()]
    ids += list(range(10**12, 10**12 + scores - len(ids)))  # a small store: scores for ids beyond it
    pairs = [(gid, (gid % 1000) / 1000) for gid in ids]
    stop, waits, errors, holds = threading.Event(), [], [], []
    window = [float("inf"), float("inf")]
    transaction = store.transaction

    @contextlib.contextmanager
    def timed_transaction(*args, **kwargs):  # how long each of the saver's transactions holds the write lock
        with transaction(*args, **kwargs) as cur:  # (body and commit)
            began = time.perf_counter()
            yield cur
        if threading.current_thread().name == "saver":
            holds.append((time.perf_counter() - began) * 1000)

    store.transaction = timed_transaction

    def caller(name: str) -> None:
        try:
            while not stop.is_set():
                pair = services.next_pair(name)
                began = time.perf_counter()
                services.vote(pair["pair_id"], name, "A")
                ended = time.perf_counter()
                waits.append((began, ended))
                services.undo(name)  # the pair is leased to this caller again
                time.sleep(0.02)
        except Exception as exc:
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=caller, args=(f"annotator{i}",)) for i in range(callers)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    window[0] = time.perf_counter()
    result: list = []
    saver = threading.Thread(target=lambda: result.append(timed(save_scores, store, version, pairs)), name="saver")
    saver.start()
    saver.join()
    save_s, saved = result[0]
    window[1] = time.perf_counter()
    store.transaction = transaction
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} callers failed while scoring, e.g. {errors[0]}")
    during = [(e - b) * 1000 for b, e in waits if e >= window[0] and b <= window[1]]
    before = [(e - b) * 1000 for b, e in waits if e < window[0]]
    return {"score_save_s": save_s, "scores_saved": saved, "score_votes_during": len(during),
            "score_lock_max_ms": max(holds, default=0.0), "score_vote_max_ms": max(during, default=0.0),
            "score_vote_max_before_ms": max(before, default=0.0)}  # fmt: skip


def generations_file(store, folder: Path) -> dict:
    """What a reward run's submit writes: the generations the new reward model will score."""
    from storage import scores

    out = folder / "generations.jsonl"
    if hasattr(scores, "write_generations_to_score"):
        seconds, count = timed(scores.write_generations_to_score, store, -1, out)
    else:  # the runner's way before: every generation as dicts, then one JSON line each

        def write() -> int:
            rows = scores.generations_to_score(store, reward_model_id=-1)
            with out.open("w", encoding="utf-8") as lines:
                lines.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            return len(rows)

        seconds, count = timed(write)
    out.unlink(missing_ok=True)
    return {"score_file_s": seconds, "score_file_rows": count}


# ---- one store, all figures ------------------------------------------------------------------------------------
def measure(db: Path, folder: Path, args: argparse.Namespace, next_id: int, model: Path | None) -> dict:
    from next_pair import fill

    from storage.db import Store

    figures: dict[str, object] = {}
    store = Store(db)
    if "labeling" not in args.skip:
        fill(store, args.callers * (4 * args.rounds + 8) + 50)  # flat out, then paced
        steps, log_mb = (2_000, 2) if args.quick else (20_000, 20)
        run_id = add_running_run(store, folder / "runs", steps=steps, log_mb=log_mb)
        figures["stats_first_ms"] = timed(store.stats)[0] * 1000
        figures["stats_ms"] = statistics.median(timed(store.stats)[0] * 1000 for _ in range(min(3, args.repeats)))
        services = make_services(store, folder / "runs")
        print("  voting ...", flush=True)
        figures.update(vote_rounds(services, args.callers, args.rounds))
        print(f"  voting, paced ({args.think_ms:.0f} ms mean pause) ...", flush=True)
        paced = vote_rounds(services, args.callers, args.rounds, args.think_ms)
        figures.update({f"paced_{name}": value for name, value in paced.items()})
        print("  tab refreshes ...", flush=True)
        figures.update(refreshes(services, run_id, args.callers, args.repeats))
    if "scoring" not in args.skip and "labeling" not in args.skip:
        print("  reward scores while voting ...", flush=True)
        figures.update(scoring_while_voting(services, args.callers, args.scores))
        figures.update(generations_file(store, folder))
    if "export" not in args.skip:
        print("  export ...", flush=True)
        figures.update(export_rate(store, folder))
    if "import" not in args.skip:
        print("  import one more file, then a big one ...", flush=True)
        rows, big_rows = (10_000, 50_000) if args.quick else (100_000, 500_000)
        figures.update(import_rate(store, folder, next_id, rows, big_rows))
    with store.read() as cur:
        figures["comparisons_stored"] = cur.execute("SELECT count(*) FROM comparisons").fetchone()[0]
    store.close()
    if "cli" not in args.skip:
        print("  python -m storage stats ...", flush=True)
        figures["stats_cli_s"] = stats_cli(db, timeout=900)  # the first one counts what was added since the app
        figures["stats_cli_again_s"] = stats_cli(db, timeout=900)
    if "app" not in args.skip and model is not None:
        print("  app start ...", flush=True)
        figures["app_start_s"] = app_start(db, model, folder, timeout=900)
    return figures


def verdict(name: str, value) -> str:
    target, kind = TARGETS.get(name, (None, None))
    if target is None or value is None:
        return "" if value is not None or target is None else "NOT met (timed out)"
    return "met" if (value <= target if kind == "max" else value >= target) else "NOT met"


def report(columns: dict[str, dict], build: dict | None) -> None:
    names = sorted({name for figures in columns.values() for name in figures})
    heads = list(columns)
    print(f"\n{'figure':28}" + "".join(f"{h:>16}" for h in heads) + f"{'target':>12}  verdict (last column)")
    for name in names:
        values = [columns[h].get(name) for h in heads]
        cells = "".join(f"{v:>16,.1f}" if isinstance(v, float) else f"{v!s:>16}" for v in values)
        target, kind = TARGETS.get(name, (None, None))
        goal = "" if target is None else f"{'≤' if kind == 'max' else '≥'} {target:,}"
        print(f"{name:28}{cells}{goal:>12}  {verdict(name, values[-1])}")
    if build:
        rate = build["per_second"]
        print(f"\nbuild: {build['comparisons']:,} comparisons imported in {build['files']} files, "
              f"{build['seconds']:.1f} s = {rate:,.0f}/s ({verdict('import_per_s', rate)}), "
              f"{build.get('cpu_seconds', 0):.1f} s CPU, load {build.get('load', 0):.1f} at the end")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prefloop-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = None if "app" in args.skip else tiny_model(work)
    big, build = work / "big.duckdb", None
    big.unlink(missing_ok=True)
    if args.reuse:
        shutil.copyfile(args.reuse, big)
    else:
        from storage.db import Store

        print(f"building a store with {args.comparisons:,} comparisons ...", flush=True)
        store = Store(big)
        build = scale_data.build(store, args.comparisons, work / "chunks", log=lambda s: print(s, flush=True))
        scale_data.add_history(store)
        store.close()
        if args.keep:
            shutil.copyfile(big, args.keep)
    import duckdb

    with duckdb.connect(str(big), read_only=True) as con:
        stored = con.execute("SELECT count(*) FROM comparisons WHERE source LIKE 'import:%'").fetchone()[0]
    (work / "empty.duckdb").unlink(missing_ok=True)
    columns = {}
    for label, db in (("empty", work / "empty.duckdb"), (f"{stored:,}", big)):
        print(f"measuring the {label} store ...", flush=True)
        folder = work / f"work-{label.replace(',', '')}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        columns[label] = measure(db, folder, args, next_id=10**8, model=model)
    empty, big = columns["empty"], columns[list(columns)[-1]]
    if "round_p95_ms" in big:
        big["round_p95_vs_empty"] = big["round_p95_ms"] / empty["round_p95_ms"]
        big["paced_round_p95_vs_empty"] = big["paced_round_p95_ms"] / empty["paced_round_p95_ms"]
    report(columns, build)
    if args.json:
        args.json.write_text(json.dumps({"columns": columns, "build": build}, indent=1, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

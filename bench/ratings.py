"""Arena ratings on 1,000,000 synthetic battles: our fit + 200-resample bootstrap vs other fits of the same data.

Battles are drawn from known Bradley–Terry ratings (30 models; ties take part of the less likely result's chance,
half from each side, so the half-tie score keeps its BT expectation). Timed on the same count table and the same
multinomial resamples:
- ours: storage.ratings (scipy.optimize trust-exact on per-pair counts, one fit per resample);
- plain numpy: Newton's method written out, all 200 resamples solved at once as a batch;
- FastChat's fit (scikit-learn LogisticRegression on weighted pair rows), only when scikit-learn is importable
  (it is not a project dependency).
Then the same battles through a DuckDB store: the SQL aggregation, the per-battle load and the leaderboard.
Run: `python bench/ratings.py` (about a minute).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from storage.db import Store  # noqa: E402
from storage.ratings import (  # noqa: E402
    PRIOR_PRECISION,
    SCALE,
    BattleCounts,
    Battles,
    battle_counts,
    bootstrap_ratings,
    fit_strengths,
    leaderboard,
    load_battles,
    to_ratings,
)

BATTLES, MODELS, ROUNDS, SEED = 1_000_000, 30, 200, 0


def synthetic(rng: np.random.Generator) -> tuple[Battles, np.ndarray]:
    truth = rng.normal(1000.0, 150.0, MODELS)
    a = rng.integers(0, MODELS, BATTLES)
    b = (a + rng.integers(1, MODELS, BATTLES)) % MODELS
    p = 1.0 / (1.0 + 10.0 ** ((truth[b] - truth[a]) / 400.0))
    tie = 0.4 * np.minimum(p, 1.0 - p)
    u = rng.random(BATTLES)
    score = np.where(u < p - tie / 2, 1.0, np.where(u < p + tie / 2, 0.5, 0.0))
    names = [f"model-{k:02d}" for k in range(MODELS)]
    return Battles(names, a.astype(np.int32), b.astype(np.int32), score), truth - truth.mean() + 1000.0


def resamples(counts: BattleCounts) -> np.ndarray:
    """The multinomial draws storage.ratings.bootstrap_ratings makes for the same seed: (rounds, pairs, 3)."""
    cells = counts.counts.ravel()
    total = int(round(cells.sum()))
    return np.random.default_rng(SEED).multinomial(total, cells / total, size=ROUNDS).reshape(ROUNDS, -1, 3)


def newton_batch(counts: BattleCounts, score: np.ndarray, played: np.ndarray) -> np.ndarray:
    """Plain numpy: Newton's method on the same penalised BT likelihood, every row of score/played at once."""
    m, i, j = len(counts.models), counts.first, counts.second
    incidence = np.zeros((len(i), m))
    incidence[np.arange(len(i)), i], incidence[np.arange(len(i)), j] = 1.0, -1.0
    theta = np.zeros((score.shape[0], m))
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(theta[:, i] - theta[:, j])))
        gradient = (played * p - score) @ incidence + PRIOR_PRECISION * theta
        h = played * p * (1.0 - p)
        hessian = np.zeros((score.shape[0], m, m))
        hessian[:, i, j] = hessian[:, j, i] = -h
        hessian[:, np.arange(m), np.arange(m)] = h @ np.abs(incidence) + PRIOR_PRECISION
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        theta -= step
        if np.abs(step).max() < 1e-12:
            break
    return to_ratings(theta)


def fastchat_fit(counts: BattleCounts, score: np.ndarray, played: np.ndarray) -> np.ndarray:
    """FastChat's compute_mle_elo: LogisticRegression (no penalty, no intercept) on two weighted rows per pair."""
    from sklearn.linear_model import LogisticRegression

    m, rows = len(counts.models), len(counts.first)
    x = np.zeros((2 * rows, m))
    x[np.arange(2 * rows), np.repeat(counts.first, 2)] = math.log(10)
    x[np.arange(2 * rows), np.repeat(counts.second, 2)] = -math.log(10)
    y = np.tile([1.0, 0.0], rows)
    weights = np.stack([score, played - score], axis=1).ravel()  # first's half-wins, then second's
    model = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-6)  # FastChat's penalty=None, now spelled C=inf
    model.fit(x, y, sample_weight=weights)
    coef = 400.0 * model.coef_[0]
    return coef - coef.mean() + 1000.0


def best_of(runs: int, fn):
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def store_figures(battles: Battles, folder: Path) -> None:
    import pyarrow as pa

    store = Store(folder / "ratings.duckdb")
    try:
        prompt = store.add_prompt("Which answer is better?", "bench")
        generation = [store.add_generation(prompt, f"answer of {name}", model_name=name) for name in battles.models]
        gen = np.array(generation)
        choice = np.where(battles.score_a == 1.0, "A", np.where(battles.score_a == 0.0, "B", "tie"))
        n = len(battles)
        rows = pa.table({"id": np.arange(1, n + 1), "prompt_id": np.full(n, prompt), "choice": choice,
                         "generation_a": gen[battles.model_a], "generation_b": gen[battles.model_b],
                         "annotator": ["bench"] * n, "source": ["bench"] * n})  # fmt: skip
        started = time.perf_counter()
        with store.transaction() as cur:
            cur.register("bench_rows", rows)
            cur.execute(f"INSERT INTO comparisons ({', '.join(rows.column_names)}) SELECT * FROM bench_rows")
            cur.unregister("bench_rows")
        print(f"store: {len(battles):,} comparisons inserted in {time.perf_counter() - started:.1f} s")
        sql, counts = best_of(3, lambda: battle_counts(store))
        per_battle, loaded = best_of(3, lambda: load_battles(store))
        board_time, board = best_of(1, lambda: leaderboard(store, bootstrap=ROUNDS, seed=SEED))
        direct = leaderboard(battles, bootstrap=ROUNDS, seed=SEED)
        assert len(loaded) == len(battles) and counts.counts.sum() == len(battles) and board == direct
        print(f"store: SQL counts per pair {sql * 1000:.0f} ms; load_battles (one row each) "
              f"{per_battle * 1000:.0f} ms; leaderboard(store, bootstrap={ROUNDS}) {board_time:.2f} s "
              "(the same rows as from memory)")  # fmt: skip
    finally:
        store.close()


def main() -> None:
    battles, truth = synthetic(np.random.default_rng(SEED))
    count_time, counts = best_of(3, lambda: battle_counts(battles))
    draws = resamples(counts).astype(np.float64)
    boot_score, boot_played = draws[:, :, 0] + 0.5 * draws[:, :, 2], draws.sum(axis=2)
    print(f"{len(battles):,} battles, {MODELS} models, {len(counts.first)} pairs; load average "
          f"{os.getloadavg()[0]:.1f}; counting per pair (numpy) {count_time * 1000:.0f} ms")  # fmt: skip

    fit_time, ours = best_of(3, lambda: to_ratings(fit_strengths(counts)))
    boot_time, ours_boot = best_of(3, lambda: bootstrap_ratings(counts, ROUNDS, SEED))
    print(f"ours (scipy trust-exact):   fit {fit_time * 1000:6.1f} ms, fit + {ROUNDS} resamples "
          f"{fit_time + boot_time:.3f} s")  # fmt: skip
    newton_fit, theirs = best_of(3, lambda: newton_batch(counts, counts.first_score[None], counts.played[None])[0])
    newton_boot, theirs_boot = best_of(3, lambda: newton_batch(counts, boot_score, boot_played))
    print(f"plain numpy Newton, batch:  fit {newton_fit * 1000:6.1f} ms, fit + {ROUNDS} resamples "
          f"{newton_fit + newton_boot:.3f} s")  # fmt: skip
    ci = lambda boot: np.percentile(boot, [2.5, 97.5], axis=0)  # noqa: E731
    print(f"max |difference| ours vs numpy: ratings {np.abs(ours - theirs).max():.2e} points, "
          f"CI bounds {np.abs(ci(ours_boot) - ci(theirs_boot)).max():.2e} points")  # fmt: skip
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("FastChat's scikit-learn fit: skipped (scikit-learn is not installed; not a project dependency)")
    else:
        fc_fit, fastchat = best_of(3, lambda: fastchat_fit(counts, counts.first_score, counts.played))
        fc_boot, fc_samples = best_of(1, lambda: np.array([fastchat_fit(counts, s, n) for s, n in
                                                            zip(boot_score, boot_played, strict=True)]))  # fmt: skip
        print(f"FastChat sklearn LR:        fit {fc_fit * 1000:6.1f} ms, fit + {ROUNDS} resamples "
              f"{fc_fit + fc_boot:.3f} s; max |difference| vs ours: ratings {np.abs(ours - fastchat).max():.3f} "
              f"points, CI bounds {np.abs(ci(ours_boot) - ci(fc_samples)).max():.3f} points")  # fmt: skip
    low, high = ci(ours_boot)
    print(f"vs the truth: max |error| {np.abs(ours - truth).max():.1f} points, median CI width "
          f"{np.median(high - low):.1f} points, {int(((low <= truth) & (truth <= high)).sum())} of {MODELS} "
          f"true ratings inside their 95% CI; {SCALE:.1f} points per natural-log unit")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-") as folder:
        store_figures(battles, Path(folder))


if __name__ == "__main__":
    main()

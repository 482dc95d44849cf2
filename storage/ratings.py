"""Arena ratings: Bradley–Terry ratings with bootstrap CIs, pairwise win-rates and head-to-head figures.

Battles. Every effective comparison (choice A, B, tie or both_bad; skipped, undone and superseded judgements are
not effective) whose two answers come from two different models is one battle. An answer's model is
"v{model_version_id}" when it has a version (v0 is the base model), otherwise its `model_name` (imported and
external models; a name shaped like a version's, "v1", is shown as "v1 (external)" so it never merges with local
version 1); answers with neither are left out. Two answers of one model judged against each other are no
battle.

Tie rule (FastChat's): a tie and a both_bad each count as half a win for each side, everywhere: in the fit, the
win-rates and the head-to-head figures.

Scale (FastChat's): rating = 1000 + 400·log10(strength), so a 400-point gap means 10:1 odds, and the ratings are
anchored by their mean, which is 1000 (what FastChat's unpenalised logistic regression gives before it pins one
named model).

Fit: the Bradley–Terry log-likelihood over counts aggregated per model pair (a million battles between 30 models
are 435 pairs), maximised by scipy.optimize (trust-exact, exact gradient and Hessian). A very weak Gaussian prior
on the log-strengths (sd 10, about 1,700 rating points) keeps the ratings finite when a model won or lost every
battle, or when the models fall into groups never compared with each other (each group is then centred on 1000
and ratings across groups mean nothing); with real counts it moves a rating by far less than its CI.

CIs: 95% percentile bootstrap, resampling battles with replacement. Resampling N battles is one multinomial draw
of N over the (pair, outcome) count table, so a resample costs a fit on the same few hundred counts.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

SCALE = 400 / math.log(10)  # rating points per natural-log unit of strength
BASE_RATING = 1000.0
PRIOR_PRECISION = 0.01  # 1 / sd² of the Gaussian prior on natural-log strengths (sd 10 ≈ 1,737 points)
BOOTSTRAP_ROUNDS = 200

EXTERNAL = " (external)"  # marks an imported/served name shaped like a local version's ("v1" → "v1 (external)")
# Names of this shape get EXTERNAL once more, so "vN" is only ever a local version and no two models merge.
_VERSION_SHAPED = "v[0-9]+( \\(external\\))*"  # SIMILAR TO: a whole-string match in DuckDB and PostgreSQL
MODEL_SQL = (  # an answer's model in ratings and counts ({g}: the generations alias)
    "CASE WHEN {g}.model_version_id IS NOT NULL THEN 'v' || {g}.model_version_id::VARCHAR "
    f"WHEN {{g}}.model_name SIMILAR TO '{_VERSION_SHAPED}' THEN {{g}}.model_name || '{EXTERNAL}' "
    "ELSE {g}.model_name END"
)
BATTLES_SQL = f"""
    SELECT {MODEL_SQL.format(g="ga")} AS model_a, {MODEL_SQL.format(g="gb")} AS model_b, c.choice
    FROM effective_comparisons c
    JOIN generations ga ON ga.id = c.generation_a
    JOIN generations gb ON gb.id = c.generation_b
"""
_BATTLES = f"SELECT * FROM ({BATTLES_SQL}) b WHERE model_a IS NOT NULL AND model_b IS NOT NULL AND model_a <> model_b"
_SCORE_A = "CASE choice WHEN 'A' THEN 1.0 WHEN 'B' THEN 0.0 ELSE 0.5 END"  # ties and both_bad: half each


@dataclass(frozen=True)
class Battles:
    """One row per battle: model indices into `models` (sorted names) and side A's score (1, 0 or 0.5)."""

    models: list[str]
    model_a: np.ndarray
    model_b: np.ndarray
    score_a: np.ndarray

    def __len__(self) -> int:
        return len(self.score_a)


@dataclass(frozen=True)
class BattleCounts:
    """Battles aggregated per model pair, pairs sorted: `first` < `second` index `models`; `counts[p]` holds the
    battles of pair p that the first model won, that the second won, and that were tied (tie or both_bad)."""

    models: list[str]
    first: np.ndarray
    second: np.ndarray
    counts: np.ndarray

    @property
    def played(self) -> np.ndarray:
        return self.counts.sum(axis=1)

    @property
    def first_score(self) -> np.ndarray:
        """The first model's half-win total per pair (wins + ties / 2)."""
        return self.counts[:, 0] + 0.5 * self.counts[:, 2]

    def battles_per_model(self) -> np.ndarray:
        m = len(self.models)
        return np.bincount(self.first, self.played, m) + np.bincount(self.second, self.played, m)


# ---- loading ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cursor(source, analytics: bool = True):
    """A cursor from a Store (its analytics()) or a DuckDB connection or cursor used as it is."""
    if hasattr(source, "analytics") and analytics:  # a Store: on PostgreSQL, a DuckDB copy of the tables read
        with source.analytics(("generations", "comparisons")) as cur:
            yield cur
    elif hasattr(source, "read"):
        with source.read() as cur:
            yield cur
    else:
        yield source


def load_battles(source) -> Battles:
    """Every battle in the store (a Store, or a DuckDB connection or cursor on a prefloop database)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    with _cursor(source) as cur:
        table = cur.sql(f"SELECT model_a, model_b, {_SCORE_A} AS score_a FROM ({_BATTLES})").to_arrow_table()
    names = pc.unique(pa.concat_arrays([table["model_a"].combine_chunks(), table["model_b"].combine_chunks()]))
    models = sorted(names.to_pylist())
    index = pa.array(models, pa.string())
    codes = [pc.index_in(table[side], value_set=index).to_numpy().astype(np.int32) for side in ("model_a", "model_b")]
    return Battles(models, codes[0], codes[1], table["score_a"].to_numpy().astype(np.float64))


def battle_counts(source) -> BattleCounts:
    """Counts per model pair: aggregated in SQL from a store or connection, or in numpy from `Battles`."""
    if isinstance(source, BattleCounts):
        return source
    if isinstance(source, Battles):
        return _count_battles(source)
    sql = f"""
        SELECT least(model_a, model_b) AS m1, greatest(model_a, model_b) AS m2,
               count(*) FILTER (WHERE (choice = 'A') = (model_a < model_b) AND choice IN ('A', 'B')) AS first_won,
               count(*) FILTER (WHERE (choice = 'A') = (model_a > model_b) AND choice IN ('A', 'B')) AS second_won,
               count(*) FILTER (WHERE choice NOT IN ('A', 'B')) AS tied
        FROM ({_BATTLES}) battles GROUP BY 1, 2"""
    with _cursor(source, analytics=False) as cur:  # plain SQL: PostgreSQL aggregates it itself
        rows = cur.execute(sql).fetchall()
    models = sorted({name for row in rows for name in row[:2]})
    code = {name: i for i, name in enumerate(models)}
    first = np.array([code[row[0]] for row in rows], dtype=np.int64)
    second = np.array([code[row[1]] for row in rows], dtype=np.int64)
    counts = np.array([row[2:] for row in rows], dtype=np.float64).reshape(-1, 3)
    return _ordered(models, first, second, counts)


def _count_battles(battles: Battles) -> BattleCounts:
    m = len(battles.models)
    a, b = battles.model_a.astype(np.int64), battles.model_b.astype(np.int64)
    low, high = np.minimum(a, b), np.maximum(a, b)
    score_low = np.where(a == low, battles.score_a, 1.0 - battles.score_a)
    outcome = np.where(score_low == 1.0, 0, np.where(score_low == 0.0, 1, 2))  # low won, high won, tied
    cells = np.bincount((low * m + high) * 3 + outcome, minlength=m * m * 3).reshape(m * m, 3)
    pairs = np.flatnonzero(cells.sum(axis=1))
    return BattleCounts(list(battles.models), pairs // m, pairs % m, cells[pairs].astype(np.float64))


def _ordered(models, first, second, counts) -> BattleCounts:
    """Counts with first < second (string order in SQL and in Python could differ), pairs in (first, second)
    order as from numpy, so a seed draws the same resamples from either."""
    swap = first > second
    first, second = np.where(swap, second, first), np.where(swap, first, second)
    counts = np.where(swap[:, None], counts[:, [1, 0, 2]], counts)
    order = np.lexsort((second, first))
    return BattleCounts(models, first[order], second[order], counts[order])


# ---- the Bradley–Terry fit ----------------------------------------------------------------------------------
def fit_strengths(
    counts: BattleCounts,
    score: np.ndarray | None = None,
    played: np.ndarray | None = None,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Natural-log strengths (mean 0) maximising the BT likelihood; `score`/`played` override the counts' own
    (a bootstrap resample of the same pairs)."""
    from scipy.optimize import minimize
    from scipy.special import expit

    m, i, j = len(counts.models), counts.first, counts.second
    score = counts.first_score if score is None else score
    played = counts.played if played is None else played
    if m == 0:
        return np.zeros(0)

    def objective(theta):
        d = theta[i] - theta[j]  # -[w·log σ(d) + (n - w)·log σ(-d)] = n·softplus(-d) + (n - w)·d
        value = np.sum(played * np.logaddexp(0.0, -d) + (played - score) * d) + 0.5 * PRIOR_PRECISION * theta @ theta
        residual = played * expit(d) - score
        return value, np.bincount(i, residual, m) - np.bincount(j, residual, m) + PRIOR_PRECISION * theta

    def hessian(theta):
        p = expit(theta[i] - theta[j])
        h = played * p * (1.0 - p)
        matrix = np.zeros((m, m))
        matrix[i, j] = -h
        matrix[j, i] = -h
        matrix[np.arange(m), np.arange(m)] = np.bincount(i, h, m) + np.bincount(j, h, m) + PRIOR_PRECISION
        return matrix

    x0 = np.zeros(m) if start is None else start
    result = minimize(objective, x0, jac=True, hess=hessian, method="trust-exact", options={"gtol": 1e-9})
    return result.x - result.x.mean()


def to_ratings(strengths: np.ndarray) -> np.ndarray:
    return BASE_RATING + SCALE * (strengths - strengths.mean(axis=-1, keepdims=True))


def bootstrap_ratings(
    counts: BattleCounts, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0, start: np.ndarray | None = None
) -> np.ndarray:
    """Ratings refitted on `rounds` resamples of the battles (with replacement), shape (rounds, models)."""
    cells = counts.counts.ravel()
    total = int(round(cells.sum()))
    draws = np.random.default_rng(seed).multinomial(total, cells / total, size=rounds)
    draws = draws.reshape(rounds, -1, 3).astype(np.float64)
    start = fit_strengths(counts) if start is None else start
    return np.array(
        [to_ratings(fit_strengths(counts, d[:, 0] + 0.5 * d[:, 2], d.sum(axis=1), start)) for d in draws]
    ).reshape(rounds, len(counts.models))


# ---- what callers use ---------------------------------------------------------------------------------------
def leaderboard(source, bootstrap: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> list[dict]:
    """[{"model", "rating", "ci_low", "ci_high", "battles"}] highest rating first. `source`: a Store, a DuckDB
    connection or cursor, `Battles` or `BattleCounts`. 95% bootstrap CIs over `bootstrap` resamples (seeded);
    with bootstrap=0, ci_low = ci_high = rating. Models without battles are not listed."""
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be 0 or more resamples, not {bootstrap}")
    counts = battle_counts(source)
    if not counts.models:
        return []
    strengths = fit_strengths(counts)
    ratings = to_ratings(strengths)
    if bootstrap:
        low, high = np.percentile(bootstrap_ratings(counts, bootstrap, seed, strengths), [2.5, 97.5], axis=0)
    else:
        low = high = ratings
    played = counts.battles_per_model()
    rows = [
        {
            "model": name,
            "rating": round(float(ratings[k]), 2),
            "ci_low": round(float(low[k]), 2),
            "ci_high": round(float(high[k]), 2),
            "battles": int(played[k]),
        }
        for k, name in enumerate(counts.models)
    ]
    return sorted(rows, key=lambda row: (-row["rating"], row["model"]))


def win_rate_matrix(source, models: list[str] | None = None) -> dict:
    """{"models", "win_rate", "battles"} for a heatmap: win_rate[r][c] is row model r's share of its battles
    against column model c (ties half; None without battles or on the diagonal), battles[r][c] their count.
    `models` default: every model with battles, highest rating first."""
    counts = battle_counts(source)
    if models is None:
        models = [row["model"] for row in leaderboard(counts, bootstrap=0)]
    where = {name: k for k, name in enumerate(models)}
    size = len(models)
    score, played = np.zeros((size, size)), np.zeros((size, size))
    for p in range(len(counts.first)):
        x, y = counts.models[counts.first[p]], counts.models[counts.second[p]]
        if x in where and y in where:
            r, c = where[x], where[y]
            played[r, c] = played[c, r] = counts.played[p]
            score[r, c] = counts.first_score[p]
            score[c, r] = counts.played[p] - counts.first_score[p]
    rates = [[float(score[r, c] / played[r, c]) if played[r, c] else None for c in range(size)] for r in range(size)]
    return {"models": list(models), "win_rate": rates, "battles": played.astype(int).tolist()}


def head_to_head(source, model_x: str, model_y: str, confidence: float = 0.95) -> dict:
    """x's record against y: {"wins", "losses", "ties", "battles", "win_rate", "ci_low", "ci_high"}.

    win_rate = (wins + ties / 2) / battles (ties include both_bad). The CI is Wilson's score interval for that
    share; half-ties have a smaller variance than a coin's, so the interval errs on the wide (safe) side. With no
    battles: win_rate None and the interval [0, 1]."""
    if model_x == model_y:
        raise ValueError("head_to_head needs two different models")
    counts = battle_counts(source)
    wins = losses = ties = 0
    for p in range(len(counts.first)):
        pair = counts.models[counts.first[p]], counts.models[counts.second[p]]
        first_won, second_won, tied = (int(v) for v in counts.counts[p])
        if pair == (model_x, model_y):
            wins, losses, ties = first_won, second_won, tied
        elif pair == (model_y, model_x):
            wins, losses, ties = second_won, first_won, tied
    battles = wins + losses + ties
    if not battles:
        return {"wins": 0, "losses": 0, "ties": 0, "battles": 0, "win_rate": None, "ci_low": 0.0, "ci_high": 1.0}
    rate = (wins + 0.5 * ties) / battles
    low, high = wilson_interval(rate, battles, confidence)
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "battles": battles,
        "win_rate": rate,
        "ci_low": low,
        "ci_high": high,
    }


def wilson_interval(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    shrink = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / shrink
    half = z / shrink * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def leaderboard_from_file(path: str | Path, bootstrap: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> list[dict]:
    """The leaderboard of a database file opened read-only (for `python -m storage leaderboard`), or of a
    PostgreSQL database (a URL)."""
    import duckdb

    from storage.postgres import is_postgres

    if is_postgres(str(path)):
        from storage.db import Store

        store = Store(str(path))
        try:
            return leaderboard(store, bootstrap=bootstrap, seed=seed)
        finally:
            store.close()
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise RuntimeError(
                f"{path} is open in another process (the app?); stop it or use another --db file"
            ) from None
        raise RuntimeError(f"cannot open {path}: {exc}") from None
    try:
        return leaderboard(con, bootstrap=bootstrap, seed=seed)
    finally:
        con.close()

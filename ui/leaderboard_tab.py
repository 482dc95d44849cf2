"""The Leaderboard tab: arena ratings with CIs, the win-rate heatmap, battles per pair, version lineage, the gate.

Everyone who may read (viewers too) sees it; the "Promote candidate" button is for admins and its handler checks
`serve` itself. Figures come from storage/ratings.py and are recomputed only when the comparisons or the serving
version changed (a timer asks every REFRESH_SECONDS; one cheap count answers it).
"""

from __future__ import annotations

import threading

import gradio as gr
import pandas as pd

from labeling.access import Access, AccessDenied
from labeling.arena import current_verdict, model_name
from labeling.services import Services, UserError
from storage.promotions import lineage, promotions
from storage.ratings import battle_counts, leaderboard, win_rate_matrix
from ui.render import plain

REFRESH_SECONDS = 30.0
BOOTSTRAP = 200  # resamples for the rating CIs
# The stacked parts of a rating's bar, top down (Vega-Lite stacks the colour domain's first value on top).
PARTS = {"CI above the rating": "#3b6fc4", "CI below the rating": "#9ab8e6", "zero to CI low": "rgba(0,0,0,0)"}
HEAT = ((0.35, "#f4a6a6"), (0.45, "#f8d3d3"), (0.55, "#eeeeee"), (0.65, "#cfe8cf"), (1.01, "#9fd49f"))  # ≤ bound


def build_leaderboard_tab(services: Services, access: Access, demo: gr.Blocks, tab: gr.Tab) -> list[gr.Timer]:
    """The Leaderboard tab's controls and handlers; returns its timers (ticking only while `tab` is shown)."""
    handlers = LeaderboardHandlers(services, access)
    refresh = gr.Button("Refresh", size="sm", elem_id="leaderboard-refresh")
    summary = gr.Markdown("", elem_id="leaderboard-summary")
    plot = gr.BarPlot(
        x="model",
        y="points",
        color="part",
        color_map=PARTS,
        colors_in_legend=list(PARTS)[:2],
        color_title="95% CI",
        tooltip=["rating", "ci_low", "ci_high", "battles"],
        x_title="model (best first)",
        y_title="rating",
        label="Bradley–Terry ratings with 95% bootstrap CIs: a bar spans the CI, the colours meet at the rating",
        elem_id="leaderboard-plot",
    )
    table = gr.Dataframe(label="Ratings", interactive=False, elem_id="leaderboard-table")
    with gr.Row():
        heatmap = gr.Dataframe(
            label="Win-rate of the row's model against the column's (ties count half)",
            interactive=False,
            elem_id="winrate-heatmap",
        )
        battles = gr.Dataframe(label="Battles per pair", interactive=False, elem_id="battles-table")
    gr.Markdown("### Candidate and promotion gate")
    gate = gr.Markdown("", elem_id="gate-evidence")
    with gr.Row(visible=False) as admin_row:  # shown on load to admins; the handler checks the caller anyway
        promote = gr.Button("Promote candidate", variant="primary", elem_id="promote-btn")
    message = gr.Markdown("", elem_id="promote-message")
    versions = gr.Dataframe(label="Versions: lineage and ratings", interactive=False, elem_id="lineage-table")
    history = gr.Dataframe(label="Promotions, overrides and rollbacks", interactive=False, elem_id="promotions-table")

    seen = gr.State(None)  # the store's state this page shows: the timer sends nothing while it holds
    outputs = [summary, plot, table, heatmap, battles, gate, versions, history, seen]
    private = {"api_visibility": "private"}
    refresh.click(handlers.refresh, None, outputs, **private)
    promote.click(handlers.promote, None, [message, *outputs], **private)
    demo.load(handlers.refresh, None, outputs, **private)
    demo.load(handlers.admin_visible, None, [admin_row], **private)
    timer = gr.Timer(REFRESH_SECONDS, active=False)
    timer.tick(handlers.refresh_if_changed, [seen], outputs, **private)
    tab.select(handlers.refresh_if_changed, [seen], outputs, **private)
    return [timer]


class LeaderboardHandlers:
    def __init__(self, services: Services, access: Access):
        self.services, self.access = services, access
        self._lock = threading.Lock()
        self._cache: tuple | None = None  # (state, figures): computed once for every page showing that state

    def admin_visible(self, request: gr.Request):
        return gr.update(visible=self.access.caller(request).may("serve"))

    def refresh(self, request: gr.Request):
        try:
            self.access.require(request, "read")
        except AccessDenied as exc:
            return f"⚠️ {exc}", *([None] * 4), "", None, None, None
        return self._shown(self._state())

    def refresh_if_changed(self, seen, request: gr.Request):
        """The timer's refresh: nothing is sent while the store's state is the one this page shows (`seen`)."""
        try:
            self.access.require(request, "read")  # first: the state is queries, and whether it changed is news
        except AccessDenied:
            return [gr.skip()] * 9
        state = self._state()
        return [gr.skip()] * 9 if state == seen else self._shown(state)

    def _shown(self, state: tuple) -> tuple:
        """The figures of `state` (computed once for all pages) and the state, for the page to keep."""
        with self._lock:
            if self._cache is None or self._cache[0] != state:
                self._cache = (state, self._figures())
            return *self._cache[1], state

    def promote(self, request: gr.Request):
        try:
            who = self.access.require(request, "serve")
            done = "✓ " + self.services.promote(actor=who.name or "admin")
        except (AccessDenied, UserError) as exc:
            done = f"⚠️ {exc}"
        return done, *self.refresh(request)

    # ---- the figures ------------------------------------------------------------------------------------------
    def _state(self) -> tuple:
        with self.services.store.read() as cur:
            counts = cur.execute("SELECT count(*), max(id) FROM comparisons").fetchone()
            promoted = cur.execute("SELECT count(*) FROM promotions").fetchone()[0]
            versions = cur.execute(
                "SELECT string_agg(id || ':' || coalesce(status, ''), ',' ORDER BY id) FROM model_versions"
            ).fetchone()
        broken = tuple(getattr(self.services.queue, "broken", {}))  # a candidate found not to load changes the text
        return (*counts, promoted, *versions, self.services.engine.active_version, broken)

    def _figures(self) -> tuple:
        store, serving = self.services.store, self.services.engine.active_version
        counts = battle_counts(store)
        board = leaderboard(counts, bootstrap=BOOTSTRAP)
        ratings = {row["model"]: row for row in board}
        broken = getattr(self.services.queue, "broken", {})  # candidates whose adapter does not load
        verdict = current_verdict(store, serving, self.services.gate, broken)
        rule = self.services.gate
        gate = "\n\n".join(
            [verdict.summary() if verdict else "No candidate is waiting: a finished policy run makes one."]
            + [f"⚠️ Not judged: {plain(why)}" for why in broken.values()]
            + [
                f"Gate: at least {rule.min_battles} battles against the serving version and a {rule.confidence:.0%} "
                f"CI of the win-rate above 50 %; serving **{model_name(serving)}**."
            ]  # fmt: skip
        )
        return (
            _summary(board, counts),
            _plot_frame(board),
            pd.DataFrame(board, columns=["model", "rating", "ci_low", "ci_high", "battles"]),
            _heatmap(win_rate_matrix(counts, [row["model"] for row in board])),
            _pairs(counts),
            gate,
            _lineage(lineage(store), ratings, serving),
            _promotions(promotions(store)),
        )


def _summary(board: list[dict], counts) -> str:
    if not board:
        return "No battles yet: judge 'versions' pairs, or import arena battles in the Data tab."
    total = int(counts.played.sum())
    return f"**{total:,}** battles between **{len(board)}** models (ties and both-bad count half a win each)."


def _plot_frame(board: list[dict]):
    """A floating bar per model from CI low to CI high: three stacked parts, the first (0 → CI low) invisible and
    below the y range, the other two meeting at the rating. Models in rating order, best first."""
    columns = ["model", "points", "part", "rating", "ci_low", "ci_high", "battles"]
    if not board:
        return pd.DataFrame(columns=columns)
    rows = []
    for row in board:
        spans = (row["ci_high"] - row["rating"], row["rating"] - row["ci_low"], row["ci_low"])  # PARTS order
        figures = [row[key] for key in ("rating", "ci_low", "ci_high", "battles")]
        rows += [[row["model"], span, part, *figures] for span, part in zip(spans, PARTS, strict=True)]
    low, high = min(r["ci_low"] for r in board), max(r["ci_high"] for r in board)
    pad = max(20.0, 0.1 * (high - low))
    return gr.update(
        value=pd.DataFrame(rows, columns=columns), y_lim=[low - pad, high + pad], sort=[r["model"] for r in board]
    )


def _heatmap(matrix: dict):
    models = matrix["models"]
    if not models:
        return pd.DataFrame(columns=["model"])
    cells = [[None if v is None else round(100 * v, 1) for v in row] for row in matrix["win_rate"]]
    frame = pd.DataFrame(cells, columns=models)
    label = "model"
    while label in models:  # any name is a model's (one named "model" too): the row column's header must differ
        label += " "
    frame.insert(0, label, models)
    return frame.style.map(_heat_colour, subset=models).format(_percent, subset=models)


def _percent(value) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.0f}%"


def _heat_colour(value) -> str:
    if value is None or pd.isna(value):
        return ""
    colour = next(c for bound, c in HEAT if value / 100 <= bound)
    return f"background-color: {colour}"


def _pairs(counts) -> pd.DataFrame:
    rows = []
    for p in range(len(counts.first)):
        first_won, second_won, tied = (int(v) for v in counts.counts[p])
        played = first_won + second_won + tied
        rows.append(
            {
                "model_x": counts.models[counts.first[p]],
                "model_y": counts.models[counts.second[p]],
                "battles": played,
                "x_wins": first_won,
                "y_wins": second_won,
                "ties": tied,
                "x_win_rate": round((first_won + tied / 2) / played, 3),
            }
        )
    columns = ["model_x", "model_y", "battles", "x_wins", "y_wins", "ties", "x_win_rate"]
    return pd.DataFrame(rows, columns=columns).sort_values("battles", ascending=False, kind="stable")


def _lineage(versions: list[dict], ratings: dict, serving: int) -> pd.DataFrame:
    rows = []
    for v in reversed(versions):  # newest first
        rating = ratings.get(model_name(v["id"]), {})
        rows.append(
            {
                "version": model_name(v["id"]),
                "status": "serving" if v["id"] == serving else v["status"],
                "parent": None if v["parent_id"] is None else model_name(v["parent_id"]),
                "run": v["run_id"],
                "method": v["method"] or ("base" if v["id"] == 0 else None),
                "trained_on": v["trained_on"],
                "rating": rating.get("rating"),
                "ci": _ci(rating),
                "battles": rating.get("battles", 0),
                "created": str(v["created_at"])[:19],
            }
        )
    return pd.DataFrame(rows)


def _ci(rating: dict) -> str:
    return f"{rating['ci_low']:.0f}–{rating['ci_high']:.0f}" if rating else ""


def _promotions(rows: list[dict]) -> pd.DataFrame:
    out = []
    for row in rows:
        e = row["evidence"]
        record = (
            (
                f"{e.get('wins', 0)}-{e.get('losses', 0)}-{e.get('ties', 0)} vs {e.get('against', '?')}, "
                f"CI {e.get('ci_low', 0):.0%}–{e.get('ci_high', 1):.0%}"
            )
            if e
            else ""
        )
        out.append(
            {
                "when": str(row["created_at"])[:19],
                "version": model_name(row["version_id"]),
                "from": None if row["from_version"] is None else model_name(row["from_version"]),
                "kind": row["kind"],
                "by": row["actor"],
                "evidence (W-L-T)": record,
            }
        )
    return pd.DataFrame(out, columns=["when", "version", "from", "kind", "by", "evidence (W-L-T)"])

"""The Data tab: stats, the last 50 comparisons, import with the CLI's importer, export downloads."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from labeling.services import Services
from storage.errors import ImportFailed
from storage.exporters import export
from storage.importers import import_file

EXPORT_FORMATS = ["dpo", "reward", "kto", "sft", "raw"]
IMPORT_FORMATS = ["auto", "txt", "csv", "prompts", "trl", "hh", "ultrafeedback", "arena", "shp"]
RECENT_COLUMNS = ["id", "created_at", "annotator", "choice", "prompt", "answer_a", "answer_b", "rationale", "edited"]


def build_data_tab(services: Services, demo: gr.Blocks) -> None:
    refresh = gr.Button("Refresh", size="sm")
    with gr.Row():
        per_choice = gr.Dataframe(label="Per choice", interactive=False)
        per_annotator = gr.Dataframe(label="Per annotator", interactive=False)
        per_version = gr.Dataframe(label="Per model version", interactive=False)
    totals = gr.Markdown("")
    recent = gr.Dataframe(label="Last 50 comparisons", interactive=False, wrap=True, max_height=500)
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Import")
            upload = gr.File(
                label="Prompt list or preference dataset (.txt .csv .json .jsonl .parquet)", elem_id="import-file"
            )
            import_format = gr.Dropdown(IMPORT_FORMATS, value="auto", label="Format")
            import_btn = gr.Button("Import", elem_id="import-btn")
            import_msg = gr.Markdown("")
        with gr.Column():
            gr.Markdown("### Export")
            export_format = gr.Dropdown(EXPORT_FORMATS, value="dpo", label="Format")
            export_ext = gr.Radio([".jsonl", ".parquet"], value=".jsonl", label="File type")
            export_btn = gr.Button("Export", elem_id="export-btn")
            download = gr.File(label="Download", interactive=False)
            export_msg = gr.Markdown("")

    def load_stats():
        stats = services.store.stats()
        return (
            _table(stats.get("per_choice", {}), "choice"),
            _table(stats.get("per_annotator", {}), "annotator"),
            _table(stats.get("per_model_version", {}), "version"),
            f"**{stats.get('prompts', 0)}** prompts · **{stats.get('generations', 0)}** generations · "
            f"**{stats.get('comparisons', 0)}** comparisons",
            _recent(services),
        )

    def do_import(file, fmt: str):
        if file is None:
            return "⚠️ Choose a file first.", *load_stats()
        path = file if isinstance(file, str) else getattr(file, "name", str(file))
        try:
            summary = import_file(services.store, path, fmt=fmt)
        except ImportFailed as exc:
            return f"⚠️ Import failed, nothing was written: {exc}", *load_stats()
        services.queue.wake()
        return (
            f"✓ Imported {summary['prompts']} prompts and {summary['comparisons']} comparisons ({summary['format']}).",
            *load_stats(),
        )

    def do_export(fmt: str, ext: str):
        out = Path(tempfile.mkdtemp(prefix="prefloop-export-")) / f"prefloop-{fmt}{ext}"
        try:
            rows = export(services.store, fmt, out)
        except ValueError as exc:
            return None, f"⚠️ Export failed: {exc}"
        if rows == 0:
            return None, f"Nothing to export as {fmt} yet: it needs judged pairs (A/B votes or edited answers)."
        return str(out), f"✓ {rows} rows in {out.name}."

    stats_out = [per_choice, per_annotator, per_version, totals, recent]
    refresh.click(load_stats, None, stats_out, api_visibility="private")
    import_btn.click(do_import, [upload, import_format], [import_msg, *stats_out], api_visibility="private").then(
        lambda: None, None, [upload], api_visibility="private"
    )  # the box is emptied for the next file; the message says what happened to this one
    export_btn.click(do_export, [export_format, export_ext], [download, export_msg], api_visibility="private")
    demo.load(load_stats, None, stats_out, api_visibility="private")
    gr.Timer(10.0).tick(load_stats, None, stats_out, api_visibility="private")  # stats stay fresh while open


def _table(counts: dict, key: str) -> pd.DataFrame:
    return pd.DataFrame([{key: str(k), "count": v} for k, v in counts.items()], columns=[key, "count"])


def _recent(services: Services) -> pd.DataFrame:
    rows = services.store.recent_comparisons(50)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=RECENT_COLUMNS)
    scores = services.reward_scores([r.get("id") for r in rows])
    if scores:
        frame["reward_a"] = [scores.get(r.get("id"), (None, None))[0] for r in rows]
        frame["reward_b"] = [scores.get(r.get("id"), (None, None))[1] for r in rows]
    return frame

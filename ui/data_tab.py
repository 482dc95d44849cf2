"""The Data tab: stats, recent comparisons, import with the CLI's importer, export downloads.

Reading counts needs the `read` role. Admins see every annotator's counts and judgements; anyone else sees the
totals and their own (another person's name, choices, rationale or typed prompt are theirs). Import and export are
admin actions, checked in the handler.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from labeling.access import Access, AccessDenied
from labeling.services import Services
from storage.errors import ImportFailed
from storage.exporters import export
from storage.importers import import_file
from ui.render import plain

EXPORT_FORMATS = ["dpo", "reward", "kto", "sft", "raw"]
EXPORT_PREFIX = "prefloop-export-"  # each export's temp folder
EXPORT_KEEP_S = 3600  # an export stays downloadable an hour (as Gradio's cached copy: ui/app.py delete_cache)
IMPORT_FORMATS = ["auto", "txt", "csv", "prompts", "trl", "hh", "ultrafeedback", "arena", "shp"]
RECENT_COLUMNS = ["id", "created_at", "annotator", "choice", "prompt", "answer_a", "answer_b", "rationale", "edited"]


def build_data_tab(
    services: Services, access: Access, demo: gr.Blocks, tab: gr.Tab, upload_max_rows: int
) -> list[gr.Timer]:
    """The Data tab's controls and handlers; returns its timers (ticking only while `tab` is shown)."""
    handlers = DataHandlers(services, access, upload_max_rows)
    refresh = gr.Button("Refresh", size="sm")
    with gr.Row():
        per_choice = gr.Dataframe(label="Per choice", interactive=False)
        per_annotator = gr.Dataframe(label="Per annotator", interactive=False)
        per_version = gr.Dataframe(label="Per model version", interactive=False)
    totals = gr.Markdown("")
    recent = gr.Dataframe(label="Last 50 comparisons", interactive=False, wrap=True, max_height=500)
    with gr.Row(visible=False) as admin_row:  # shown on load to admins; the handlers check the caller anyway
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

    stats_out, private = [per_choice, per_annotator, per_version, totals, recent], {"api_visibility": "private"}
    refresh.click(handlers.stats, None, stats_out, **private)
    import_btn.click(handlers.do_import, [upload, import_format], [import_msg, *stats_out], **private).then(
        lambda: None, None, [upload], **private
    )  # the box is emptied for the next file; the message says what happened to this one
    export_btn.click(handlers.do_export, [export_format, export_ext], [download, export_msg], **private)
    demo.load(handlers.stats, None, stats_out, **private)
    demo.load(handlers.admin_visible, None, [admin_row], **private)
    timer = gr.Timer(10.0, active=False)  # stats stay fresh while the tab is shown
    timer.tick(handlers.stats, None, stats_out, **private)
    tab.select(handlers.stats, None, stats_out, **private)
    return [timer]


class DataHandlers:
    def __init__(self, services: Services, access: Access, upload_max_rows: int):
        self.services, self.access, self.upload_max_rows = services, access, upload_max_rows

    def admin_visible(self, request: gr.Request):
        return gr.update(visible=self.access.caller(request).may("import"))

    def stats(self, request: gr.Request):
        try:
            who = self.access.require(request, "read")
        except AccessDenied:
            return None, None, None, "", None
        stats, own = self.services.store.stats(), None if who.may("see_all") else (who.name or "")
        per_annotator = stats.get("per_annotator", {})
        return (
            _table(stats.get("per_choice", {}), "choice"),
            _table(
                per_annotator if own is None else {k: v for k, v in per_annotator.items() if k == own}, "annotator"
            ),
            _table(stats.get("per_model_version", {}), "version"),
            f"**{stats.get('prompts', 0)}** prompts · **{stats.get('generations', 0)}** generations · "
            f"**{stats.get('comparisons', 0)}** comparisons",
            self.recent(own),
        )

    def recent(self, only_own_of: str | None) -> pd.DataFrame:
        """The last 50 comparisons (only `only_own_of`'s, when given; none for a caller without a name)."""
        rows = self.services.store.recent_comparisons(50, only_own_of) if only_own_of != "" else []
        frame = pd.DataFrame(rows)
        if frame.empty:
            return pd.DataFrame(columns=RECENT_COLUMNS)
        scores = self.services.reward_scores([r.get("id") for r in rows])
        if scores:
            frame["reward_a"] = [scores.get(r.get("id"), (None, None))[0] for r in rows]
            frame["reward_b"] = [scores.get(r.get("id"), (None, None))[1] for r in rows]
        return frame

    def do_import(self, file, fmt: str, request: gr.Request):
        try:
            self.access.require(request, "import")
        except AccessDenied as exc:
            return f"⚠️ {exc}", *([gr.skip()] * 5)
        if file is None:
            return "⚠️ Choose a file first.", *self.stats(request)
        path = file if isinstance(file, str) else getattr(file, "name", str(file))
        try:
            summary = import_file(self.services.store, path, fmt=fmt, max_rows=self.upload_max_rows)
        except ImportFailed as exc:
            return f"⚠️ Import failed, nothing was written: {plain(exc)}", *self.stats(request)
        self.services.queue.wake()
        done = (
            f"✓ Imported {summary['prompts']} prompts and {summary['comparisons']} comparisons "
            f"({plain(summary['format'])})."
        )
        return done, *self.stats(request)

    def do_export(self, fmt: str, ext: str, request: gr.Request):
        try:
            self.access.require(request, "export")
        except AccessDenied as exc:
            return None, f"⚠️ {exc}"
        if fmt not in EXPORT_FORMATS or ext not in (".jsonl", ".parquet"):
            return None, "⚠️ Unknown export format."
        prune_exports(EXPORT_KEEP_S)
        folder = Path(tempfile.mkdtemp(prefix=EXPORT_PREFIX))
        out = folder / f"prefloop-{fmt}{ext}"
        try:
            rows = export(self.services.store, fmt, out)
        except ValueError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            return None, f"⚠️ Export failed: {plain(exc)}"
        if rows == 0:
            shutil.rmtree(folder, ignore_errors=True)
            return None, f"Nothing to export as {fmt} yet: it needs judged pairs (A/B votes or edited answers)."
        return str(out), f"✓ {rows} rows in {out.name}."  # Gradio serves a copy; this folder goes at a later prune


def prune_exports(older_than_s: float) -> int:
    """Delete the export folders this app left in the temp folder more than `older_than_s` ago (each export is a
    whole copy of the judgements; Gradio serves its own cached copy, which build_app's delete_cache expires)."""
    cutoff, removed = time.time() - older_than_s, 0
    for folder in Path(tempfile.gettempdir()).glob(f"{EXPORT_PREFIX}*"):
        with contextlib.suppress(OSError):  # another app process may be pruning the same one
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder)
                removed += 1
    return removed


def _table(counts: dict, key: str) -> pd.DataFrame:
    return pd.DataFrame([{key: str(k), "count": v} for k, v in counts.items()], columns=[key, "count"])

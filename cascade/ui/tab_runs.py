"""Runs tab: every run folder under --runs with its settings, loss, grids, summary and report."""
from __future__ import annotations

from cascade.ui import safety
from cascade.ui.runs_view import describe, run_folders


def run_choices(ctx) -> list[str]:
    return [str(p.relative_to(ctx.runs)) for p in run_folders(ctx.runs)]


def show(ctx, choice: str | None):
    run = ctx.runs / (choice or "")
    if not choice or not safety.inside(run, ctx.runs) or not run.is_dir():
        return None, "", None, [], [], None, "", ""
    d = describe(run)
    report = (f"[download report.html](/gradio_api/file={safety.text(d['report'])})" if d["report"] else
              "no report.html in this folder")
    return (d["settings"], d["config"], str(d["loss_png"]) if d["loss_png"] else None,
            [(str(p), p.stem) for p in d["validation"]], [(str(p), p.stem) for p in d["grids"]], d["summary"],
            report, d["log"])


def build(ctx, tab):
    import gradio as gr

    with gr.Row():
        pick = gr.Dropdown(run_choices(ctx), label="run folder", elem_id="runs-pick", scale=4)
        refresh = gr.Button("refresh", scale=1)
    with gr.Row():
        with gr.Column():
            settings = gr.JSON(label="settings (.cascade-run)", elem_id="runs-settings")
            config = gr.Code(label="config.yaml", language="yaml", interactive=False, elem_id="runs-config")
        with gr.Column():
            loss = gr.Image(label="loss.png", interactive=False, elem_id="runs-loss", height=240)
            validation = gr.Gallery(label="validation grids", columns=4, height=200, object_fit="contain", elem_id="runs-validation")
    grids = gr.Gallery(label="grids", columns=4, height=240, object_fit="contain", elem_id="runs-grids")
    with gr.Row():
        summary = gr.JSON(label="summary (summary.json or samples.json)", elem_id="runs-summary")
        with gr.Column():
            report = gr.Markdown(elem_id="runs-report")
            log = gr.Textbox(label="log.txt (end)", lines=8, max_lines=8, interactive=False, elem_id="runs-log")

    def choices():
        return gr.update(choices=run_choices(ctx))

    pick.change(lambda c: show(ctx, c), pick, [settings, config, loss, validation, grids, summary, report, log])
    refresh.click(choices, None, pick)
    tab.select(choices, None, pick)

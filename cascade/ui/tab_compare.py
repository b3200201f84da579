"""Compare SR tab: run `cascade study-sr` (base SR, fine-tuned exports, variants it trains) as a
queued job, and show any study's grids (with the truth), table and plots. The study's files are
read generically (results.csv, table.md, *.png), whatever columns the study writes."""
from __future__ import annotations

from cascade.ui import commands, safety
from cascade.ui.jobs import Job
from cascade.ui.runs_view import exports, images, read_csv, read_text, studies
from cascade.ui.tab_subject import messages, to_subject


def study_choices(ctx) -> list[str]:
    return [str(p.relative_to(ctx.runs)) for p in studies(ctx.runs)]


def show(ctx, choice: str | None):
    """(table as escaped Markdown, results.csv as a table, grids, plots) of one study folder."""
    import pandas as pd

    folder = ctx.runs / (choice or "")
    if not choice or not safety.inside(folder, ctx.runs) or not folder.is_dir():
        return "", pd.DataFrame(), [], []
    header, rows = read_csv(folder / "results.csv")
    table = pd.DataFrame(rows, columns=header) if header else pd.DataFrame()
    pngs = images(folder)
    grids = [(str(p), p.stem) for p in pngs if p.stem.startswith("grid")]
    plots = [(str(p), p.stem) for p in pngs if not p.stem.startswith("grid")]
    return safety.text(read_text(folder / "table.md")), table, grids, plots


def build(ctx, subject, tab):
    import gradio as gr

    gr.Markdown("The base SR model is always in the study (its reference); add fine-tuned stage II exports "
                "and/or variants the study trains itself. On the toy preset the study also reads each output "
                "with the toy world's exact readers (stripes, emblem).")
    with gr.Row():
        with gr.Column(scale=1):
            srs = gr.CheckboxGroup([e.label for e in exports(ctx.runs) if e.stage == 2], label="fine-tuned SR exports",
                                   elem_id="compare-exports")
            variants = gr.Textbox(value="low=0:0 high=0:250", label="variants to train (NAME=MIN:MAX ...; blank: none)",
                                  elem_id="compare-variants")
            steps = gr.Textbox(label="training steps per variant (blank: the preset's)", elem_id="compare-steps")
            levels = gr.Textbox(value="0,20,250", label="sampling noise levels", elem_id="compare-levels")
            dino = gr.Textbox(value="none", label="DINO model (hub id, folder, tiny or none)")
            extra = gr.Textbox(label="more settings: --set KEY=VALUE, one per line", lines=2, elem_id="compare-extra")
            go = gr.Button("run the study", variant="primary", elem_id="compare-go")
            status = gr.Markdown(elem_id="compare-status")
        with gr.Column(scale=2):
            pick = gr.Dropdown(study_choices(ctx), label="study folder", elem_id="compare-pick")
            table = gr.Markdown(elem_id="compare-table")
            results = gr.Dataframe(label="results.csv", interactive=False, max_height=240, elem_id="compare-results")
            grids = gr.Gallery(label="grids (rows: models; columns: input, each level, the truth)", columns=1,
                               height=320, object_fit="contain", elem_id="compare-grids")
            plots = gr.Gallery(label="plots", columns=2, height=260, object_fit="contain", elem_id="compare-plots")

    def on_go(folder, noun, preset_v, ident, srs_v, variants_v, steps_v, levels_v, dino_v, extra_v):
        subj = to_subject(folder, noun, preset_v, ident)
        errors = commands.check_train(subj, commands.TrainSettings(stages=(2,)))
        if errors:
            return safety.text(errors.get("settings", "") or "see the Subject tab"), *messages(errors)
        out = ctx.new_folder(f"study-sr-{subj.class_noun}")
        argv = commands.study_argv(subj, [str(ctx.runs / s / "export") for s in srs_v or []], variants_v, steps_v,
                                   levels_v or "0,20,250", out, dino_v, commands.extra_lines(extra_v))
        ctx.queue.submit(Job("study-sr", argv, f"study-sr -> {out.name}", out))
        return f"queued {safety.text(out.name)}; it appears in the study list when it has results", "", "", "", ""

    def on_tab():
        return (gr.update(choices=[e.label for e in exports(ctx.runs) if e.stage == 2]),
                gr.update(choices=study_choices(ctx)))

    def on_tick(last):
        jobs = [j for j in ctx.queue.jobs if j.kind == "study-sr"]
        if not jobs:
            return gr.skip(), gr.skip(), last
        j = jobs[-1]
        text = safety.text(f"{j.title}: {j.summary()}" + (f" ({j.error})" if j.error else ""))
        if text == last:
            return gr.skip(), gr.skip(), last
        finished = j.state == "done" and last is not None and "done" not in last
        return text, gr.update(choices=study_choices(ctx)) if finished else gr.skip(), text

    go.click(on_go, [*subject.inputs(), srs, variants, steps, levels, dino, extra], [status, *subject.msgs])
    pick.change(lambda c: show(ctx, c), pick, [table, results, grids, plots])
    tab.select(on_tab, None, [srs, pick])
    last = gr.State(None)
    gr.Timer(1.0).tick(on_tick, last, [status, pick, last], show_progress="hidden")

"""Train tab: stage I and/or II with the settings people change; start, cancel, resume; a live
progress bar with ETA, the loss curve and each validation grid as the run writes it."""
from __future__ import annotations

from pathlib import Path

from cascade.ui import commands, safety
from cascade.ui.jobs import Job
from cascade.ui.runs_view import images, losses
from cascade.ui.tab_subject import messages, to_subject

STAGES = {"stage I": 1, "stage II": 2}


def progress_html(job: Job | None) -> str:
    """A progress bar from numbers only (no user text reaches this HTML)."""
    if job is None:
        return "<div id='train-progress-text'>no training job yet</div>"
    frac = job.n / job.total if job.total else (1.0 if job.state == "done" else 0.0)
    pct = int(round(100 * frac))
    return (f"<progress id='train-progress-bar' value='{pct}' max='100' style='width:100%'></progress>"
            f"<div id='train-progress-text' data-state='{job.state}'>{safety.text(job.summary())}</div>")


def queue_rows(ctx) -> list[list]:
    return [[j.id, j.kind, j.title, j.state, j.summary()] for j in reversed(ctx.queue.jobs)]


def loss_points(job: Job | None):
    """Loss per step: the run's loss.csv where written, the live bar's readings after it."""
    import pandas as pd

    pts = {}
    if job is not None:
        pts.update(job.losses)
        if job.run_dir is not None:
            pts.update({s: v for s, v, _ in losses(job.run_dir)})
    return pd.DataFrame({"step": list(pts), "loss": list(pts.values())}).sort_values("step") if pts else \
        pd.DataFrame({"step": [], "loss": []})


def preset_defaults(preset: str) -> dict[str, str]:
    """The preset's values of the fields, shown as placeholders (stage I's; stage II's where only it has one)."""
    from cascade.config import load_config

    try:
        cfg = load_config(preset)
    except Exception:  # an unreadable preset: the checks say why when a job is started
        return {}
    t1, t2 = cfg.stage1.train, cfg.stage2.train
    level = cfg.stage2.sample.noise_level
    return {"max_steps": f"{t1.max_steps} (stage II {t2.max_steps})", "learning_rate": f"{t1.learning_rate:g}",
            "prior_preservation": "on" if t1.prior_preservation else "off", "prior_weight": f"{t1.prior_weight:g}",
            "lora_rank": str(t1.lora_rank), "noise_aug": f"{t2.noise_aug_min}:{t2.noise_aug_max}",
            "sample_level": str(level) if level >= 0 else "the top of the training range"}


def shown_job(ctx) -> Job | None:
    """The running training job, else the newest one."""
    trains = [j for j in ctx.queue.jobs if j.kind == "train"]
    return next((j for j in trains if j.state == "running"), trains[-1] if trains else None)


def build(ctx, subject):
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=1):
            stages = gr.CheckboxGroup(list(STAGES), value=["stage I"], label="stages", elem_id="train-stages")
            d = preset_defaults(ctx.preset)
            with gr.Row():
                steps = gr.Textbox(label="steps", placeholder=d.get("max_steps", ""), elem_id="train-steps")
                lr = gr.Textbox(label="learning rate", placeholder=d.get("learning_rate", ""), elem_id="train-lr")
            prior = gr.Radio(["preset", "on", "off"], value="preset", elem_id="train-prior",
                             label=f"prior preservation (preset: {d.get('prior_preservation', '?')})")
            with gr.Row():
                prior_weight = gr.Textbox(label="prior weight", placeholder=d.get("prior_weight", ""))
                lora = gr.Textbox(label="LoRA rank (0: full)", placeholder=d.get("lora_rank", ""))
            with gr.Row():
                noise_aug = gr.Textbox(label="stage II noise aug MIN[:MAX]", placeholder=d.get("noise_aug", ""))
                level = gr.Textbox(label="stage II sampling level", placeholder=d.get("sample_level", ""))
            gr.Markdown("Blank fields keep the preset's value (shown greyed).")
            extra = gr.Textbox(label="more settings: --set KEY=VALUE, one per line", lines=2, elem_id="train-extra")
            with gr.Row():
                start = gr.Button("start", variant="primary", elem_id="train-start")
                cancel = gr.Button("cancel", variant="stop", elem_id="train-cancel")
                resume = gr.Button("resume", elem_id="train-resume")
            msg = gr.Markdown(elem_id="train-msg")
            error = gr.Markdown(elem_id="train-error")
        with gr.Column(scale=2):
            progress = gr.HTML(progress_html(None), elem_id="train-progress")
            with gr.Row():
                live = gr.LinePlot(x="step", y="loss", label="loss (live)", elem_id="train-loss-live", height=220)
                loss_png = gr.Image(label="loss.png (as the run writes it)", elem_id="train-loss", height=220,
                                    interactive=False)
            grids = gr.Gallery(label="validation grids (samples/step-*.png)", columns=4, height=200,
                               object_fit="contain", elem_id="train-grids")
            queue = gr.Dataframe(headers=["job", "kind", "what", "state", "progress"], label="jobs (one at a time)",
                                 interactive=False, elem_id="train-queue")
            log = gr.Textbox(label="output of the running command", lines=6, max_lines=6, elem_id="train-log")
    timer = gr.Timer(1.0)

    def settings(stages_v, steps_v, lr_v, prior_v, pw, lora_v, aug, level_v, extra_v):
        return commands.TrainSettings(tuple(STAGES[s] for s in stages_v), steps_v, lr_v,
                                      None if prior_v == "preset" else prior_v == "on", pw, lora_v, aug or "",
                                      level_v, commands.extra_lines(extra_v))

    def on_start(folder, noun, preset_v, ident, *train):
        subj, s = to_subject(folder, noun, preset_v, ident), settings(*train)
        errors = commands.check_train(subj, s)
        if errors:
            where = [f for f in ("photos", "class_noun", "preset", "identifier") if f in errors]
            text = safety.text(errors.get("settings", "")) or f"see the Subject tab ({', '.join(where)})"
            return text, *messages(errors)
        for stage in s.stages:
            out = ctx.new_folder(f"stage{stage}-{subj.class_noun}")
            ctx.queue.submit(Job("train", commands.train_argv(subj, s, stage, out),
                                 f"stage {stage}: {subj.class_noun} -> {out.name}", out))
        return "queued: " + ", ".join(f"stage {st}" for st in s.stages), "", "", "", ""

    def on_cancel():
        job = ctx.queue.to_cancel("train")
        if job is None:
            return "no training job to cancel"
        job.cancel()
        return f"cancelled job {job.id} ({safety.text(job.title)}); resume continues its run from the last checkpoint"

    def on_resume():
        job = ctx.queue.to_resume("train")
        if job is None:
            return "nothing to resume: no cancelled or failed training job"
        again = ctx.queue.resume(job)
        return f"job {again.id}: {safety.text(again.title)}"

    def on_tick(last):
        job = shown_job(ctx)
        run = job.run_dir if job else None
        png = str(run / "loss.png") if run and (run / "loss.png").is_file() else None
        grid_files = [(str(p), p.stem) for p in images(run / "samples", "step-*.png")] if run else []
        log_text = "\n".join(list(job.lines)[-6:]) if job else ""
        error = safety.text(job.error) if job and job.error else ""
        pts = loss_points(job)
        new = [progress_html(job), pts, png, grid_files, queue_rows(ctx), log_text, error]
        keys = [new[0], tuple(map(tuple, pts.values.tolist())), (png, png and Path(png).stat().st_mtime),
                tuple(grid_files), str(new[4]), log_text, error]
        out = [gr.skip() if last and k == old else v for v, k, old in zip(new, keys, last or [None] * 7)]
        return *out, keys

    last = gr.State(None)
    start.click(on_start, [*subject.inputs(), stages, steps, lr, prior, prior_weight, lora, noise_aug, level, extra],
                [msg, *subject.msgs])
    cancel.click(on_cancel, None, msg)
    resume.click(on_resume, None, msg)
    timer.tick(on_tick, last, [progress, live, loss_png, grids, queue, log, error, last], show_progress="hidden")

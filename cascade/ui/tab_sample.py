"""Sample tab: base or fine-tuned models per stage, prompt, seeds, guidance and the SR noise level
as a slider; stage I, II (and III) images side by side for the same seeds."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from cascade.ui import commands, safety
from cascade.ui.jobs import Job
from cascade.ui.runs_view import exports, read_json

BASE = "base (the preset's)"


def model_choices(ctx, stage: int) -> list[str]:
    extra = ["none"] if stage == 2 else []
    found = [e.label for e in exports(ctx.runs) if e.stage == stage]
    if stage == 3:
        return ["none", "tiny"]
    return [BASE, *extra, *found]


def model_arg(ctx, choice: str | None) -> str | None:
    if not choice or choice == BASE:
        return None
    if choice in ("none", "tiny"):
        return choice
    path = ctx.runs / choice / "export"
    return str(path) if safety.inside(path, ctx.runs) else None


def preset_level(preset: str) -> int:
    from cascade.config import load_config

    try:
        level = load_config(preset).stage2.sample.noise_level
    except Exception:
        return 100
    return level if level >= 0 else 0


def outputs(folder: Path) -> tuple[list, list, list, str]:
    """Each stage's images captioned with their seed, and the prompts as sampled (plain text)."""
    rec = read_json(folder / "samples.json") or {}
    seeds = {i["index"]: i["seed_stage1"] for i in rec.get("images", [])}
    per_stage = []
    for stage in ("stage1", "stage2", "stage3"):
        files = sorted((folder / stage).glob("[0-9]*.png")) if (folder / stage).is_dir() else []
        per_stage.append([(str(f), f"seed {seeds.get(int(f.stem), '?')}") for f in files])
    s2 = rec.get("stage2") or {}
    info = "\n".join([*(f"prompt: {p}" for p in rec.get("prompts", [])),
                      f"stage II noise level: {s2.get('noise_level', '-')}", f"folder: {folder}"])
    return *per_stage, info


def build(ctx, subject, tab):
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=1):
            m1 = gr.Dropdown(model_choices(ctx, 1), value=BASE, label="stage I model", elem_id="sample-stage1")
            m2 = gr.Dropdown(model_choices(ctx, 2), value=BASE, label="stage II model", elem_id="sample-stage2")
            m3 = gr.Dropdown(model_choices(ctx, 3), value="none", label="stage III (x4 upscaler)")
            prompt = gr.Textbox(label="prompt ([V] = the stage I export's identifier)", elem_id="sample-prompt",
                                value=f"a [V] {'toy' if ctx.preset == 'toy' else 'dog'}")
            with gr.Row():
                num = gr.Number(value=2, precision=0, minimum=1, maximum=16, label="images (seeds)", elem_id="sample-num")
                seed = gr.Number(value=0, precision=0, minimum=0, label="first seed")
            guidance = gr.Textbox(label="guidance (blank: the preset's)", elem_id="sample-guidance")
            level = gr.Slider(0, 999, value=preset_level(ctx.preset), step=1, label="stage II noise level "
                              "(re-samples on release)", elem_id="sample-noise")
            extra = gr.Textbox(label="more settings: --set KEY=VALUE, one per line", lines=2, elem_id="sample-extra")
            go = gr.Button("sample", variant="primary", elem_id="sample-go")
            status = gr.Markdown(elem_id="sample-status")
        with gr.Column(scale=2):
            with gr.Row():
                g1 = gr.Gallery(label="stage I", columns=2, height=260, object_fit="contain", elem_id="sample-out1")
                g2 = gr.Gallery(label="stage II", columns=2, height=260, object_fit="contain", elem_id="sample-out2")
                g3 = gr.Gallery(label="stage III", columns=2, height=260, object_fit="contain", elem_id="sample-out3")
            info = gr.Textbox(label="as sampled (samples.json)", lines=3, interactive=False, elem_id="sample-info")

    def run(preset_v, m1_v, m2_v, m3_v, prompt_v, num_v, seed_v, guidance_v, level_v, extra_v):
        out = ctx.new_folder("sample")
        argv = commands.sample_argv(preset_v or ctx.preset, prompt_v or "", num_v or 1, seed_v or 0,
                                    model_arg(ctx, m1_v), model_arg(ctx, m2_v), model_arg(ctx, m3_v),
                                    guidance_v, level_v, out, commands.extra_lines(extra_v))
        job = Job("sample", argv, f"sample {out.name}", out)
        thread = threading.Thread(target=job.run, args=(ctx.runs, ctx.queue.env), daemon=True)
        thread.start()
        while thread.is_alive():
            yield safety.text(f"sampling: {job.summary()}"), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            time.sleep(0.5)
        ctx.reserved.discard(out)
        if job.state != "done":
            yield safety.text(job.error or job.state), [], [], [], ""
            return
        yield safety.text(f"done in {job.summary().split('after ')[-1]}"), *outputs(out)

    inputs = [subject.preset, m1, m2, m3, prompt, num, seed, guidance, level, extra]
    go.click(run, inputs, [status, g1, g2, g3, info])
    level.release(run, inputs, [status, g1, g2, g3, info])
    tab.select(lambda: (gr.update(choices=model_choices(ctx, 1)), gr.update(choices=model_choices(ctx, 2))),
               None, [m1, m2])

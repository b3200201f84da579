"""The model card every export carries: README.md in the Hugging Face convention (YAML front matter
with base_model, license, tags; a body with the identifier, the prompt to use, how to load it, the
training settings, the last validation grid and the measured fidelity/drift when the run has them).

Everything comes from the export's cascade.json and, when the export sits in its run folder, from
that folder: samples/step-NNNNNN.png (the last grid is copied into the export as validation.png, so
an upload carries it), validation.csv (the last row's measures) and best/best.json (a chosen
checkpoint); what is absent is left out of the card."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import yaml

from stages.components import EXPORT_META, LORA_WEIGHTS

CARD = "README.md"
GRID = "validation.png"
IF_LICENSE = {"license": "other", "license_name": "deepfloyd-if-license",
              "license_link": "https://huggingface.co/spaces/DeepFloyd/deepfloyd-if-license"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_STEP_GRID = re.compile(r"^step-(\d+)\.png$")


def _hub_id(base: str) -> str | None:
    """The base model's hub id, or None for a local folder."""
    return base if _HUB_ID.match(base) and not Path(base).exists() else None


def _base_shown(meta: dict) -> str:
    """The base model as the card names it: its hub id, or a local folder by its last two parts."""
    base = str(meta.get("base", "?"))
    return f"`{base}`" if _hub_id(base) else f"a local folder (`{'/'.join(Path(base).parts[-2:])}`)"


def _grid(run_dir: Path, step: int | None) -> tuple[int, Path] | None:
    """The validation grid of `step` (None: the last one)."""
    grids = [(int(m.group(1)), p) for p in (run_dir / "samples").glob("step-*.png") if (m := _STEP_GRID.match(p.name))]
    if step is not None:
        grids = [g for g in grids if g[0] == step]
    return max(grids) if grids else None


def _measures(run_dir: Path, step: int | None) -> dict:
    """validation.csv's row of `step` (None: the last row), without empty cells; {} when the row holds
    no measure besides its step (a run without live measures)."""
    path = run_dir / "validation.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if step is None or str(r.get("step")) == str(step)]
    row = {k: v for k, v in rows[-1].items() if v not in ("", None)} if rows else {}
    return row if set(row) - {"step"} else {}


def front_matter(meta: dict) -> dict:
    stage = meta.get("stage", 1)
    base = str(meta.get("base", ""))
    hub = _hub_id(base)
    fm: dict = {}
    if hub:
        fm["base_model"] = hub
    fm.update(IF_LICENSE)
    fm["library_name"] = "diffusers"
    fm["pipeline_tag"] = "text-to-image"
    fm["instance_prompt"] = meta.get("instance_prompt", "")
    tags = ["text-to-image", "diffusers", "deepfloyd-if", "dreambooth", f"if-stage-{'i' * stage}", "cascade"]
    if meta.get("kind") == "lora":
        tags.append("lora" if (meta.get("training") or {}).get("lora_type", "lora") == "lora" else "dora")
    fm["tags"] = tags
    fm["inference"] = False
    return fm


def _usage(meta: dict, repo: str) -> str:
    stage = meta.get("stage", 1)
    base = _hub_id(str(meta.get("base", ""))) or "<the base model folder>"
    pipe = "IFPipeline" if stage == 1 else "IFSuperResolutionPipeline"
    if meta.get("kind") == "lora":
        load = f'pipe = {pipe}.from_pretrained("{base}")\npipe.load_lora_weights("{repo}")'
    else:
        variant = f', variant="{meta["variant"]}"' if meta.get("variant") else ""
        load = (f'unet = UNet2DConditionModel.from_pretrained("{repo}", subfolder="unet"{variant})\n'
                f'pipe = {pipe}.from_pretrained("{base}", unet=unet)')
    return f"```python\nfrom diffusers import {pipe}, UNet2DConditionModel\n\n{load}\n```"


def body(meta: dict, grid_step: int | None, measures: dict, best: dict | None, repo: str = "<this repo>") -> str:
    stage = meta.get("stage", 1)
    prompt = meta.get("instance_prompt", "")
    lines = [f"# DreamBooth: DeepFloyd IF stage {'I' * stage}, \"{prompt}\"", "",
             f"Fine-tuned with cascade (DreamBooth for the IF pixel cascade) from {_base_shown(meta)} "
             f"({'LoRA adapter' if meta.get('kind') == 'lora' else 'full UNet'}).", "",
             f"- identifier: `{meta.get('identifier', '?')}`, class: `{meta.get('class_noun', '?')}`",
             f"- prompt to use: `{prompt}`, in context: `{prompt} on a beach`",
             f"- resolution: {meta.get('resolution', '?')} px"
             + (f", from {meta['lowres_size']} px (noise level {meta.get('sample_noise_level')})"
                if stage == 2 and meta.get("lowres_size") else ""),
             f"- weights: {'the exponential moving average (EMA) of training' if meta.get('weights') == 'ema' else 'the last training step'}"
             + (f" (chosen checkpoint: step {best['step']})" if best and best.get("step") is not None else ""), ""]
    if meta.get("config") in ("tiny", "toy") or "tiny-v1" in str(meta.get("base", "")):
        lines += ["> Trained from cascade's tiny random-initialised components: the images are noise, "
                  "not a usable model.", ""]
    lines += ["Use of DeepFloyd IF weights and their derivatives is governed by the DeepFloyd IF license; "
              "accept it on the base model's hub page first.", "", "## How to use", "", _usage(meta, repo), "",
              "## Training settings", "", "| setting | value |", "| --- | --- |"]
    settings = {"steps": meta.get("steps"), "loss": meta.get("loss"), "lora_rank": meta.get("lora_rank"),
                "captions": meta.get("captions"), **(meta.get("training") or {})}
    if meta.get("ema"):
        settings.update({f"ema_{k}": v for k, v in meta["ema"].items() if k in ("decay", "start_step")})
    if stage == 2 and meta.get("noise_aug") is not None:
        settings["noise_aug"] = meta["noise_aug"]
    if not meta.get("lora_rank"):
        settings = {k: v for k, v in settings.items() if not k.startswith("lora_")}
    lines += [f"| {k} | {v if v != '' else '(default)'} |" for k, v in settings.items() if v is not None]
    chosen = best.get("step") if best else None
    if grid_step is not None:
        which = "The validation grid of the chosen step" if chosen is not None else "The last validation grid"
        lines += ["", "## Validation", "", f"{which} (step {grid_step}):", "",
                  f"![validation grid at step {grid_step}]({GRID})"]
    if measures:
        step = measures.get("step", "?")
        lines += ["", f"## Measured at step {step}", "", "| measure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in measures.items() if k != "step"]
    if best and best.get("reason"):
        lines += ["", f"Checkpoint choice: {best['reason']}"]
    return "\n".join(lines) + "\n"


def write_model_card(export_dir: Path, run_dir: Path | None = None, repo: str = "<this repo>") -> Path:
    """Write export_dir/README.md (atomic); `run_dir` defaults to the export's parent (its run folder)."""
    export_dir = Path(export_dir)
    meta = read_meta(export_dir)
    run_dir = Path(run_dir) if run_dir is not None else export_dir.parent
    best = _best(meta, run_dir)
    step = best.get("step") if best else None  # the chosen step's grid and measures, not the last step's
    grid = _grid(run_dir, step)
    if grid is not None:
        tmp = export_dir / (GRID + ".tmp")
        shutil.copyfile(grid[1], tmp)
        os.replace(tmp, export_dir / GRID)
    text = ("---\n" + yaml.safe_dump(front_matter(meta), sort_keys=False) + "---\n\n"
            + body(meta, grid[0] if grid else None, _measures(run_dir, step), best, repo))
    tmp = export_dir / (CARD + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, export_dir / CARD)
    return export_dir / CARD


def _best(meta: dict, run_dir: Path) -> dict | None:
    """The best-checkpoint choice: cascade.json's record (the trainer's), else best/best.json."""
    for key in ("best_checkpoint", "best"):
        if isinstance(meta.get(key), dict):
            return meta[key]
    for best_file in (run_dir / "best" / "best.json", run_dir / "best.json"):
        if best_file.is_file():
            return json.loads(best_file.read_text())
    return None


def read_meta(export_dir: Path) -> dict:
    return json.loads((Path(export_dir) / EXPORT_META).read_text())


def is_export(folder: Path) -> bool:
    return (folder / EXPORT_META).is_file() and ((folder / "unet").is_dir() or (folder / LORA_WEIGHTS).is_file())

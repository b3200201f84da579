"""Usability (issue 9, item 14): help texts, log.txt completeness, progress bars, grid shape, long
prompts in warnings, LoRA export file modes and reproducible bytes."""
from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
from PIL import Image

from cascade import models, runner
from cascade.cli.main import build_parser, main


def _parsers(parser, name="cascade"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_help_is_whole_and_every_flag_explained():
    parser = build_parser()
    top = parser.format_help()
    assert parser.description.endswith(".") and "DreamBooth" in parser.description
    assert "lives here" not in top and "scripts/ are" not in top  # the old cut-off docstring line
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in _parsers(parser) for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and (not a.help or a.help == argparse.SUPPRESS)]
    assert missing == []
    subs = dict(_parsers(parser))
    set_help = {n: next(a.help for a in p._actions if "--set" in a.option_strings) for n, p in subs.items()
                if any("--set" in a.option_strings for a in p._actions)}
    assert "stage2.train" in set_help["cascade train stage2"] and "stage1" not in set_help["cascade train stage2"]
    assert "stage1.train" in set_help["cascade train stage1"]


def test_grid_is_near_square():
    assert runner.grid_columns(25, 1) == 5  # was 1 column: a 256x6400 strip
    assert runner.grid_columns(25, 4) == 12  # whole prompts per row: 12 x 9
    assert runner.grid_columns(2, 2) == 2 and runner.grid_columns(1, 16) == 4 and runner.grid_columns(1, 1) == 1


def test_one_overall_bar_per_stage_and_grid_shape(make_cfg, tmp_path, capsys):
    cfg = make_cfg("stage1.sample.steps=1", "stage1.sample.batch_size=1")
    paths = models.resolve(cfg)
    paths = models.ModelPaths(paths.stage1, "none", "none", paths.text_encoder)
    capsys.readouterr()
    runner.run_cascade(cfg, paths, ["a dog", "a cat", "a red toy"], 1, 0, tmp_path / "o", progress=True)
    err = capsys.readouterr().err
    assert "stage I (64px)" in err and "3/3" in err and "sampling 64px" not in err
    assert Image.open(tmp_path / "o" / "grid-stage1.png").size == (128, 128)  # 2 x 2, not 64 x 192


def test_stage3_shows_progress(monkeypatch, capsys):
    import diffusers

    from stages import stage3

    class FakePipe:
        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, prompt, image, callback=None, num_inference_steps=1, **kw):
            for i in range(num_inference_steps):
                callback(i, 0, None)
            return type("Out", (), {"images": [im.resize((4 * im.width, 4 * im.height)) for im in image]})

    monkeypatch.setattr(diffusers.StableDiffusionUpscalePipeline, "from_pretrained", lambda *a, **k: FakePipe())
    images = [Image.new("RGB", (8, 8))] * 3
    out = stage3.upscale("x", images, ["p"] * 3, [None] * 3, 2, 1.0, 100, None, 2, progress=True)
    err = capsys.readouterr().err
    assert len(out) == 3 and "stage III" in err and "3/3" in err and "step 2/2" in err


def test_long_prompt_is_shortened_in_warnings(tiny, tmp_path, caplog):
    from cascade.text import TextEncoder

    prompt = " ".join(["dog"] * 500)
    with caplog.at_level(logging.WARNING):
        TextEncoder(str(tiny / "stage1"), tmp_path).check_lengths([prompt])
    (msg,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(msg) < 200 and "(500 words)" in msg


def _lora_run(make_cfg, subject, out):
    cache = make_cfg().models.cache_dir
    sets = [f"models.cache_dir={cache}", "stage1.train.max_steps=1", "stage1.train.prior_preservation=false",
            "stage1.train.validation_images=0"]
    code = main(["train", "stage1", "--subject", str(subject), "--class-noun", "dog", "--identifier", "zwx",
                 "--lora-rank", "2", "--output", str(out), *[a for s in sets for a in ("--set", s)]])
    assert code == 0
    return out


def test_lora_export_modes_bytes_and_log(make_cfg, tmp_path):
    from safetensors import safe_open

    from stages.components import LORA_WEIGHTS

    subject = tmp_path / "subject"
    subject.mkdir()
    Image.fromarray(np.full((80, 80), 90, np.uint8), "L").save(subject / "grey.png")  # one photo, greyscale
    a = _lora_run(make_cfg, subject, tmp_path / "a")
    b = _lora_run(make_cfg, subject, tmp_path / "b")
    wa, wb = a / "export" / LORA_WEIGHTS, b / "export" / LORA_WEIGHTS
    assert wa.read_bytes() == wb.read_bytes()  # identical runs, identical bytes (and digests)
    mode = os.stat(a / "export" / "cascade.json").st_mode & 0o777
    assert os.stat(wa).st_mode & 0o777 == mode == 0o666 & ~_umask()
    with safe_open(str(wa), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.target_modules"] == sorted(meta["unet.target_modules"])  # hash order varies per process
    log = (a / "log.txt").read_text()
    assert "identifier: 'zwx'" in log  # logged before the run folder existed
    assert "has 1 photo(s)" in log and "is L, converted to RGB" in log


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m

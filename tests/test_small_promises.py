"""Issue 17 item 19: settings keep the text as typed, YAML words are no identifiers, the help names
every preset, the log says where an identifier came from, third-party notices stay off the console."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascade.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_string_settings_are_never_yaml():
    cfg = load_config(None, ["models.stage1=!weird", "models.stage2=a #1", "models.variant=null",
                             "models.text_encoder='quoted'", "models.stage3=on"])
    assert (cfg.models.stage1, cfg.models.stage2, cfg.models.variant) == ("!weird", "a #1", None)
    assert (cfg.models.text_encoder, cfg.models.stage3) == ("quoted", "on")
    assert load_config(None, ["stage1.train.learning_rate=1e-5"]).stage1.train.learning_rate == 1e-5  # numbers: YAML


@pytest.mark.parametrize("word", ["yes", "no", "true", "off", "null", "Yes"])
def test_yaml_words_are_not_identifiers(word):
    from cascade.identifier import IdentifierError, check_identifier

    with pytest.raises(IdentifierError, match="common word"):
        check_identifier(word, "dog")
    assert check_identifier("zq", "dog") == "zq"


def test_config_help_names_every_preset(capsys):
    from cascade.cli.main import main

    assert main(["sample", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in ("tiny", "toy", "if-m", "if-l", "if-xl")) and "default tiny" in text
    assert main(["demo", "--help"]) == 0
    assert "default toy" in " ".join(capsys.readouterr().out.split())


def test_the_log_says_where_the_identifier_came_from(make_cfg, caplog):
    from cascade import training

    req = training.TrainRequest(1, make_cfg("identifier.token=zq"), "s", "dog")
    with caplog.at_level(logging.INFO):
        assert training._pick_identifier(req, "unused") == "zq"
    assert "from identifier.token / --identifier" in caplog.text and "(given)" not in caplog.text


def test_torchvision_notice_is_dropped(caplog):
    import cascade  # noqa: F401 - installs the filters

    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`ViTImageProcessor` requires torchvision (not installed); falling back to `ViTImageProcessorPil`")
        logging.getLogger("transformers.utils.import_utils").warning("a warning that matters")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels")
    assert "torchvision" not in caplog.text and "gemm_4bit" not in caplog.text and "a warning that matters" in caplog.text


def test_deepspeed_cpu_notice_is_silenced():
    pytest.importorskip("deepspeed")
    code = ("from cascade.runs.folders import console_logging; console_logging(); "
            "from deepspeed.accelerator import get_accelerator; print(get_accelerator()._name)")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: DeepSpeed picks cuda and prints no CPU notice anyway")
    assert r.returncode == 0 and r.stdout.strip().endswith("cpu"), r.stderr[-2000:]
    assert "Setting accelerator to CPU" not in r.stdout + r.stderr


@pytest.mark.parametrize("prompts, images", [(2, 6), (3, 10), (2, 16), (25, 4), (4, 3), (1, 16), (5, 1), (3, 9)])
def test_sample_grids_keep_each_prompt_on_its_own_rows(tmp_path, prompts, images):
    """Issue 17 item 16: a grid row never holds part of one prompt and part of another, and the
    demo's caption says the layout the grid has."""
    import numpy as np
    from PIL import Image

    from cascade import runner

    colours = [(40 * p % 250, 90, 200 - 30 * p % 200) for p in range(prompts)]
    (tmp_path / "stage1").mkdir()
    for p in range(prompts):
        for k in range(images):
            Image.new("RGB", (8, 8), colours[p]).save(tmp_path / "stage1" / f"{p * images + k:05d}.png")
    cols, slots = runner.grid_slots(prompts, images)
    runner._write_grids(tmp_path, cols, slots)
    grid = np.asarray(Image.open(tmp_path / "grid-stage1.png"))
    assert grid.shape[1] == cols * 8
    rows = {}
    for r in range(grid.shape[0] // 8):
        cells = [tuple(grid[r * 8 + 4, c * 8 + 4]) for c in range(cols)]
        rows[r] = [colours.index(c) for c in cells if c != (255, 255, 255)]
    for prompt in range(prompts):  # a row shared by prompts holds all images of each of them
        spanned = [r for r, ps in rows.items() if prompt in ps]
        assert sum(ps.count(prompt) for ps in rows.values()) == images
        if any(set(rows[r]) != {prompt} for r in spanned):
            assert len(spanned) == 1
    caption = runner.grid_caption(prompts, images)
    if prompts > 1 and all(len(ps) == images for ps in rows.values() if ps):
        assert caption == "one row per prompt"
    assert runner.grid_caption(2, 6) == "one row per prompt" and runner.grid_columns(2, 6) == 6  # the toy demo's


def test_stage_exports_of_one_identifier_but_two_subjects_warn(tiny, tmp_path, caplog):
    """Issue 17 item 14: sampling a stage I and a stage II export that share an identifier but were
    trained on other subjects or classes warns (the samples would mix two subjects)."""
    import json

    from cascade import model_checks, runner
    from cascade.models import ModelPaths

    def export(name, stage, **meta):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cascade.json").write_text(json.dumps({"base": str(tiny / f"stage{stage}"), "kind": "lora",
                                                         "stage": stage, "identifier": "zq", **meta}))
        return str(folder)

    dog, cat = tmp_path / "dog", tmp_path / "cat"
    for f in (dog, cat):
        f.mkdir()
    (cat / "01.png").write_bytes(b"x")
    s1 = export("s1", 1, class_noun="dog", **model_checks.subject_record(str(dog)))
    same = export("s2-same", 2, class_noun="dog", **model_checks.subject_record(str(dog)))
    other = export("s2-cat", 2, class_noun="cat", **model_checks.subject_record(str(cat)))
    with caplog.at_level(logging.WARNING):
        runner.check_request(ModelPaths(s1, same, "none", str(tiny / "stage1")), ["a zq dog"])
    assert "different subjects" not in caplog.text
    with caplog.at_level(logging.WARNING):
        runner.check_request(ModelPaths(s1, other, "none", str(tiny / "stage1")), ["a zq dog"])
        runner.check_request(ModelPaths(s1, other, "none", str(tiny / "stage1")), ["a zq dog"])
    assert caplog.text.count("share the identifier 'zq' but were trained on different subjects") == 1
    assert "class noun 'dog' vs 'cat'" in caplog.text and "subject files" in caplog.text

"""`cascade build-tiny`, `cascade identifier`, `cascade class-images`: what users run before training."""
from __future__ import annotations

import json

import pytest

from cascade.cli.main import main, parse_args


def test_build_tiny_layout_loads_in_diffusers(tmp_path, capsys):
    from diffusers import IFPipeline, IFSuperResolutionPipeline, StableDiffusionUpscalePipeline

    out = tmp_path / "tiny"
    assert main(["build-tiny", "--output", str(out)]) == 0
    assert "random weights" in capsys.readouterr().out
    for f in ("stage1/model_index.json", "stage1/unet/config.json", "stage1/text_encoder/config.json",
              "stage1/tokenizer/tokenizer_config.json", "stage1/scheduler/scheduler_config.json",
              "stage2/image_noising_scheduler/scheduler_config.json", "stage3/vae/config.json"):
        assert (out / f).is_file(), f
    off = dict(safety_checker=None, watermarker=None, feature_extractor=None, requires_safety_checker=False)
    p1 = IFPipeline.from_pretrained(out / "stage1", **off)
    p2 = IFSuperResolutionPipeline.from_pretrained(out / "stage2", **off)
    StableDiffusionUpscalePipeline.from_pretrained(out / "stage3")
    assert p1.unet.config.in_channels == 3 and p1.unet.config.out_channels == 6
    assert p2.unet.config.in_channels == 6 and p2.unet.config.class_embed_type == "timestep"
    assert p1.scheduler.config.variance_type == "learned_range" and p1.scheduler.config.thresholding
    assert json.loads((out / "BUILD.json").read_text())["seed"] == 0
    assert main(["build-tiny", "--output", str(out)]) == 2  # never overwrites


def test_identifier_command(make_cfg, capsys):
    cache = make_cfg().models.cache_dir
    assert main(["identifier", "--set", f"models.cache_dir={cache}", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["identifier", "--set", f"models.cache_dir={cache}", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and "T5 token id" in first


def test_class_images_command_is_resumable(make_cfg, tmp_path, capsys):
    cache = make_cfg().models.cache_dir
    argv = ["class-images", "--set", f"models.cache_dir={cache}", "--set", "stage1.sample.steps=2",
            "--class-noun", "dog", "--output", str(tmp_path / "cls")]
    assert main([*argv, "--num", "2"]) == 0
    made = {p.name: p.read_bytes() for p in (tmp_path / "cls").glob("*.png")}
    assert sorted(made) == ["class-000000.png", "class-000001.png"]
    (tmp_path / "cls" / "class-000001.png").unlink()  # an interrupted run lost one
    assert main([*argv, "--num", "3"]) == 0
    after = {p.name: p.read_bytes() for p in (tmp_path / "cls").glob("*.png")}
    assert sorted(after) == ["class-000000.png", "class-000001.png", "class-000002.png"]
    assert after["class-000000.png"] == made["class-000000.png"]
    assert after["class-000001.png"] == made["class-000001.png"]  # regenerated from its own seed


def test_train_flags_become_typed_config_values():
    from cascade.cli.main import _train_flags

    args = parse_args(["train", "stage2", "--subject", "s", "--class-noun", "dog", "--noise-aug", "0:5",
                       "--sample-noise-level", "5", "--max-steps", "7", "--lora-rank", "4", "--model", "m/x"])
    assert _train_flags(args) == [("--model", "models.stage2", "m/x"), ("--max-steps", "stage2.train.max_steps", 7),
                                  ("--lora-rank", "stage2.train.lora_rank", 4),
                                  ("--noise-aug", "stage2.train.noise_aug_min", 0),
                                  ("--noise-aug", "stage2.train.noise_aug_max", 5),
                                  ("--sample-noise-level", "stage2.sample.noise_level", 5)]
    with pytest.raises(SystemExit):
        parse_args(["train", "stage3", "--subject", "s", "--class-noun", "dog"])

"""Silent mismatches made loud (issue 9, item 13): identifiers of combined exports, sampling level vs
training range, class folders of another class, lowercase [v], stage III without stage II, empty
prompts, the base SR model's own level for class pairs, crop_source_size below stage II's size."""
from __future__ import annotations

import json
import logging

import pytest

from cascade import models, runner
from cascade.cli.main import main
from tests.conftest import sets
from cascade.config import load_config
from stages.components import EXPORT_META


@pytest.fixture
def sample(cli):
    """`cascade sample` of one image at one step per stage."""
    return lambda *argv: cli("sample", *sets("stage1.sample.steps=1", "stage2.sample.steps=1"), "--num-images", "1",
                             *argv)


def _fake_export(folder, base, stage, identifier):
    """An export record over the base weights (kind lora, no adapter needed for the checks here)."""
    folder.mkdir(parents=True)
    (folder / EXPORT_META).write_text(json.dumps({"base": str(base), "kind": "lora", "stage": stage,
                                                 "identifier": identifier}))
    return folder


def test_exports_with_different_identifiers_are_refused(sample, tiny, tmp_path):
    e1 = _fake_export(tmp_path / "e1", tiny / "stage1", 1, "zwx")
    e2 = _fake_export(tmp_path / "e2", tiny / "stage2", 2, "jaw")
    code, err = sample("--prompt", "a [V] dog", "--stage1", str(e1), "--stage2", str(e2),
                       "--output", str(tmp_path / "o"))
    assert code == 2 and "'zwx'" in err and "'jaw'" in err and "e1" in err and "e2" in err
    assert not (tmp_path / "o").exists()
    same = _fake_export(tmp_path / "e3", tiny / "stage2", 2, "zwx")
    runner.check_request(models.ModelPaths(str(e1), str(same), "none", str(tiny / "stage1")), ["a [V] dog"])


def test_lowercase_placeholder_is_filled(tiny, tmp_path):
    e1 = _fake_export(tmp_path / "e1", tiny / "stage1", 1, "zwx")
    assert runner.fill_identifier("a [v] dog and a [V] cat", str(e1)) == "a zwx dog and a zwx cat"


def test_stage3_without_stage2_and_empty_prompts(sample, tmp_path):
    code, err = sample("--prompt", "a dog", "--stage2", "none", "--stage3", "tiny", "--output", str(tmp_path / "a"))
    assert code == 2 and "--stage3 tiny" in err and "stage II is none" in err and not (tmp_path / "a").exists()
    code, err = sample("--prompt", "a dog", "--prompt", "  ", "--output", str(tmp_path / "b"))
    assert code == 2 and "--prompt number 2 is empty" in err and not (tmp_path / "b").exists()
    with pytest.raises(runner.InputError, match="prompt 1 is empty"):
        runner.check_request(models.ModelPaths("x", "none", "none", "x"), [""])


def test_sample_level_outside_training_range_warns(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        main(["train", "stage2", "--subject", str(tmp_path / "none"), "--class-noun", "dog",
              "--noise-aug", "100:300", "--sample-noise-level", "50"])
    assert any("noise level 50, outside the training range 100..300" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        main(["train", "stage2", "--subject", str(tmp_path / "none"), "--class-noun", "dog",
              "--noise-aug", "100:300", "--sample-noise-level", "200"])
    assert not any("outside the training range" in r.message for r in caplog.records)


def test_class_folder_of_another_class_is_refused(make_cfg, subject_dir, tmp_path, capsys):
    cache = make_cfg().models.cache_dir
    common = ["--set", f"models.cache_dir={cache}", "--set", "stage1.sample.steps=1", "--num", "1",
              "--output", str(tmp_path / "cls")]
    assert main(["class-images", "--class-noun", "dog", *common]) == 0
    assert json.loads((tmp_path / "cls" / "cascade-class.json").read_text())["prompt"] == "a dog"
    before = sorted(p.name for p in (tmp_path / "cls").iterdir())
    capsys.readouterr()
    assert main(["class-images", "--class-noun", "cat", *common]) == 2
    err = capsys.readouterr().err
    assert "'a dog'" in err and "'a cat'" in err
    assert main(["class-images", "--class-noun", "dog", "--stage", "2", *common]) == 2  # 64px images as 256px
    assert "stage 1" in capsys.readouterr().err
    code = main(["train", "stage1", "--subject", str(subject_dir), "--class-noun", "cat", "--class-dir",
                 str(tmp_path / "cls"), "--set", f"models.cache_dir={cache}", "--output", str(tmp_path / "run")])
    assert code == 2 and "'a dog'" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert sorted(p.name for p in (tmp_path / "cls").iterdir()) == before


def test_class_pairs_use_the_base_sr_models_own_level(make_cfg, monkeypatch):
    import torch

    from stages import sampling

    seen = []

    def spy(unet, scheduler, embeds, *a, resolution, **kw):  # records the level; the UNet is not run
        seen.append(kw.get("noise_level") if kw.get("lowres") is not None else None)
        return torch.zeros(embeds.shape[0], 3, resolution, resolution)

    monkeypatch.setattr(sampling, "sample", spy)
    cfg = make_cfg("stage2.sample.noise_level=20", "stage1.sample.steps=1", "stage2.sample.steps=1")
    emb = torch.zeros(1, 77, 32)
    out = runner.class_pair_sampler(cfg, models.resolve(cfg), emb, emb)([0])
    assert out.shape == (1, 3, 256, 256)
    assert seen == [None, runner.DEFAULT_SR_NOISE_LEVEL] and runner.DEFAULT_SR_NOISE_LEVEL == 250


def test_crop_source_smaller_than_stage2_is_a_config_error(make_cfg, subject_dir, tmp_path, capsys):
    """Checked against stage II's size read from its model (256 on the tiny preset), before any folder."""
    cache = make_cfg().models.cache_dir
    out = tmp_path / "run"
    code = main(["train", "stage2", "--subject", str(subject_dir), "--class-noun", "dog", "--output", str(out),
                 "--set", f"models.cache_dir={cache}", "--set", "stage2.train.random_crop=true",
                 "--set", "stage2.train.crop_source_size=200"])
    assert code == 2 and not out.exists()
    assert "stage2.train.crop_source_size" in capsys.readouterr().err
    assert load_config(None, ["stage2.train.crop_source_size=200"]).stage2.train.crop_source_size == 200

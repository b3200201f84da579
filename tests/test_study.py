"""`cascade study-sr` end to end on tiny components: --train fine-tunes a low and a high
noise-augmentation variant, then the sweep writes its CSV, table, plots and grids."""
from __future__ import annotations

import csv
import json

from PIL import Image

from cascade.cli.main import main

FAST = ["--set", "stage1.sample.steps=1", "--set", "stage2.sample.steps=1", "--set", "stage2.train.validation_images=0",
        "--set", "stage2.train.checkpoint_every=100"]


def test_study_sr_train_end_to_end(tmp_path, make_cfg, write_subject, capsys, monkeypatch):
    """Also: other objects are read for drift under 'a <class>' (issue 28: they were upsampled with
    'a [V] <class>'), and again, labelled apart, under the instance prompt. The sampler is wrapped to see
    which embeddings each input really got (batch size 1: one call per input)."""
    import torch

    from stages import sampling

    calls, real_sample = [], sampling.sample

    def recording(unet, sched, embeds, *a, **k):
        calls.append(embeds.clone())
        return real_sample(unet, sched, embeds, *a, **k)

    monkeypatch.setattr(sampling, "sample", recording)
    subject = write_subject(tmp_path / "subject", 2, 256)
    out = tmp_path / "study"
    code = main(["study-sr", "--subject", str(subject), "--class-noun", "toy", "--train",
                 "--variant", "low=0:0", "--variant", "high=0:250", "--max-steps", "1", "--noise-levels", "0,250",
                 "--num-stage1", "1", "--max-images", "1", "--dino", "tiny", "--output", str(out), "--seeds", "0",
                 "--class-images", "1", "--set", "stage2.sample.batch_size=1",
                 "--set", f"models.cache_dir={make_cfg().models.cache_dir}", *FAST])
    assert code == 0
    base = [r for r in csv.DictReader(open(out / "results.csv")) if r["model"] == "base" and r["noise_level"] == "0"]
    assert [(r["input"], r["view"]) for r in base] == [
        ("real", "training"), ("stage1", "stage I sample"), ("class", "class (base stage I 'a <class>')"),
        ("class", "instance prompt (base stage I 'a <class>')")]
    token = json.loads((out / "results.json").read_text())["identifier"]
    assert [r["prompt"] for r in base] == [f"a {token} toy", f"a {token} toy", "a toy", f"a {token} toy"]
    sampled = [c for c in calls if c.shape[0] == 1]  # stage I's samples are batched apart
    real, _, cls, inst = sampled[-4:]  # the last model's last level: 4 inputs
    assert torch.equal(real, inst) and not torch.equal(real, cls)
    assert "class prompt 'a <class>'" in (out / "table.md").read_text()
    # the positive control ran for every SR model (tiny random weights: whatever it says is about noise)
    controls = json.loads((out / "results.json").read_text())["controls"]
    assert [c["model"] for c in controls] == ["base", "low (aug 0..0)", "high (aug 0..250)"]
    # tiny is an epsilon model: at t = 999 (alpha_bar 2e-9) its x0 is no read, so 300 and 500 only
    assert all(c["levels"] == [0, 250] and c["level_effect"] is not None and set(c["shares"]) == {"300", "500"}
               for c in controls)
    assert "## Positive control" in (out / "table.md").read_text()
    printed = capsys.readouterr().out
    assert "describes noise" in printed and "mean nothing" in printed
    for name, rng in (("low", [0, 0]), ("high", [0, 250])):
        meta = json.loads((out / "train" / "seed0" / name / "export" / "cascade.json").read_text())
        assert meta["noise_aug"] == rng and meta["stage"] == 2
    rows = list(csv.DictReader(open(out / "results.csv")))
    models = list(dict.fromkeys(r["model"] for r in rows))
    assert models == ["bilinear upsampling (no model)", "base", "low (aug 0..0)", "high (aug 0..250)"]
    assert len(rows) == 4 + 3 * 2 * 4  # bilinear + 3 models x 2 levels x (real, stage I, class under 2 prompts)
    real = [r for r in rows if r["input"] == "real"]
    assert all(r["psnr"] and r["ssim"] and r["hf_ratio"] for r in real)
    assert all(r["psnr"] == "" and r["hf_ratio"] for r in rows if r["input"] in ("stage1", "class"))
    assert {r["train_aug"] for r in rows} == {"none", "pretrained", "0:0", "0:250"} and {r["seed"] for r in rows} == {"0"}
    assert all(r["view"] == "training" and r["heldout"] == "False" for r in real)  # one photo: nothing held out
    # fine-tuning changed the SR model: same input, seed and level, different output
    by = {(r["model"], r["noise_level"], r["image"]): r for r in real}
    assert by[("low (aug 0..0)", "0", "0")]["psnr"] != by[("base", "0", "0")]["psnr"]
    # the level changes the condition: same model, different output
    assert by[("base", "0", "0")]["psnr"] != by[("base", "250", "0")]["psnr"]
    table = (out / "table.md").read_text()
    assert "What the sweep found" in table and "unavailable" in table or "LPIPS: lpips package" in table
    for f in ("plot-real.png", "plot-stage1.png", "grid-real.png", "grid-stage1.png"):
        assert (out / f).stat().st_size > 0
    grid = Image.open(out / "grid-real.png")
    assert grid.size == (150 + 128 * 4, 18 + 128 * 4)  # input, 2 levels, truth x bilinear + 3 models


def test_study_sr_needs_models(tmp_path, make_cfg, write_subject, capsys):
    subject = write_subject(tmp_path / "subject", 2, 256)
    code = main(["study-sr", "--subject", str(subject), "--class-noun", "toy", "--output", str(tmp_path / "s"),
                 "--set", f"models.cache_dir={make_cfg().models.cache_dir}"])
    assert code == 2 and "--train" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    code = main(["study-sr", "--subject", str(subject), "--class-noun", "toy", "--train", "--noise-levels", "0,1000",
                 "--output", str(tmp_path / "s")])
    assert code == 2 and "--noise-levels" in capsys.readouterr().err


def test_study_sr_holdout_seeds_and_missing_dino(tmp_path, make_cfg, write_subject):
    """--holdout: the variants train on the other photos only and the held-out one is scored as such;
    per-seed rows; a DINO model that is not in the cache is an 'unavailable' column, not an error."""
    import numpy as np

    subject = write_subject(tmp_path / "subject", 4, 256)
    out = tmp_path / "study"
    code = main(["study-sr", "--subject", str(subject), "--class-noun", "toy", "--train", "--variant", "low=0:0",
                 "--max-steps", "1", "--noise-levels", "0", "--num-stage1", "0", "--class-images", "0",
                 "--seeds", "0,1", "--holdout", "1", "--max-images", "4", "--dino", "no-such-org/dino-not-cached", "--output", str(out),
                 "--set", f"models.cache_dir={make_cfg().models.cache_dir}", *FAST])
    assert code == 0
    photos = sorted(subject.iterdir())
    held = np.asarray(Image.open(photos[-1]).convert("RGB"))
    trained_on = sorted((out / "training-photos").iterdir())
    assert len(trained_on) == 3
    assert not any(np.array_equal(np.asarray(Image.open(p).convert("RGB")), held) for p in trained_on)
    for seed in (0, 1):
        cfg_text = (out / "train" / f"seed{seed}" / "low" / "config.yaml").read_text()
        assert f"seed: {seed}" in cfg_text
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["seed"] for r in rows} == {"0", "1"}
    held_rows = [r for r in rows if r["heldout"] == "True"]
    assert held_rows and all(r["view"] == "held-out" and r["image"] == "3" for r in held_rows)
    assert {r["image"] for r in rows if r["view"] == "training"} == {"0", "1", "2"}
    assert all(r["dino"] == "" for r in rows)
    info = json.loads((out / "results.json").read_text())
    assert info["dino"].startswith("DINO: unavailable") and info["heldout_photos"] == [3]
    assert {(m["view"], m["n_seeds"]) for m in info["means"]} >= {("held-out", 2), ("training", 2)}
    assert len(info["per_seed"]) == 2 * len(info["means"])
    table = (out / "table.md").read_text()
    assert "## Held-out views" in table and "## Training views" in table and "unavailable" in table


def test_holdout_split():
    from cascade.evaluation.sr_study import split_holdout
    from stages.errors import InputError

    assert split_holdout(5, None, True) == ([0, 1, 2, 3], [4])
    assert split_holdout(3, None, True) == ([0, 1, 2], [])
    assert split_holdout(5, 2, True) == ([0, 1, 2], [3, 4])
    assert split_holdout(5, 2, False) == ([0, 1, 2, 3, 4], [])  # nothing trained here: nothing to hold out
    import pytest

    with pytest.raises(InputError):
        split_holdout(2, 2, True)


def test_merge_sweeps_run_per_seed(tmp_path):
    """Sweeps run one seed each merge into means over seeds; a seed measured twice is refused."""
    import pytest

    from cascade.evaluation.sr_study_report import merge

    def sweep(folder, seed, f1):
        folder.mkdir()
        row = {"seed": seed, "view": "held-out", "heldout": True, "input": "real", "model": "base",
               "train_aug": "pretrained", "prior": False, "noise_level": 0, "n": 7, "psnr": 20.0 + seed,
               "ssim": 0.5, "hp_corr": 0.1, "lpips": None, "hf_ratio": 1.0, "dino": None, "freckle_f1": f1}
        (folder / "results.json").write_text(json.dumps({"per_seed": [row], "readers": [],
                                                         "truth_readers": ["freckle_f1"]}))
        return folder

    a, b = sweep(tmp_path / "a", 0, 0.2), sweep(tmp_path / "b", 1, 0.6)
    seeds, means = merge([a, b])
    assert len(seeds) == 2 and len(means) == 1
    m = means[0]
    assert m["n_seeds"] == 2 and abs(m["freckle_f1"] - 0.4) < 1e-9 and abs(m["psnr"] - 20.5) < 1e-9
    assert abs(m["freckle_f1_std"] - 0.2828427) < 1e-6 and m["lpips"] is None
    with pytest.raises(ValueError):
        merge([a, a])


def test_presets_size_the_study_grid_and_bad_settings_name_their_key(capsys):
    """The study's grid comes from the preset's `study:` section (the tiny one small enough for a CPU);
    a bad value names the flag or the config key, before anything runs."""
    import pytest

    from cascade.config import ConfigError, load_config
    from cascade import study_grid

    tiny, toy = load_config("tiny").study, load_config("toy").study
    assert len(study_grid.variants(tiny.variants.split())) == 2 and study_grid.levels(tiny.noise_levels) == [0, 250]
    assert [v[1:3] for v in study_grid.variants(toy.variants.split())] == [(0, 0), (0, 20), (100, 100), (250, 250)]
    assert study_grid.levels(toy.noise_levels) == [0, 20, 100, 250] and study_grid.seeds(toy.seeds) == [0, 1, 2]
    for key, bad in (("study.seeds", "0,x"), ("study.noise_levels", "0,1000"), ("study.variants", "a=0:0 a=9:9")):
        with pytest.raises(ConfigError, match=key):
            load_config("tiny", [f"{key}={bad}"])
    code = main(["study-sr", "--subject", "nowhere", "--class-noun", "toy", "--train", "--variant", "x=5:1"])
    assert code == 2 and "--variant" in capsys.readouterr().err


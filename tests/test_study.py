"""`cascade study-sr` end to end on tiny components: --train fine-tunes a low and a high
noise-augmentation variant, then the sweep writes its CSV, table, plots and grids."""
from __future__ import annotations

import csv
import json

from PIL import Image

from cascade.cli.main import main

FAST = ["--set", "stage1.sample.steps=1", "--set", "stage2.sample.steps=1", "--set", "stage2.train.validation_images=0",
        "--set", "stage2.train.checkpoint_every=100"]


def test_study_sr_train_end_to_end(tmp_path, make_cfg, write_subject, capsys):
    subject = write_subject(tmp_path / "subject", 2, 256)
    out = tmp_path / "study"
    code = main(["study-sr", "--subject", str(subject), "--class-noun", "toy", "--train",
                 "--variant", "low=0:0", "--variant", "high=0:250", "--max-steps", "1", "--noise-levels", "0,250",
                 "--num-stage1", "1", "--max-images", "1", "--dino", "tiny", "--output", str(out),
                 "--set", f"models.cache_dir={make_cfg().models.cache_dir}", *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert "describes noise" in printed and "mean nothing" in printed
    for name, rng in (("low", [0, 0]), ("high", [0, 250])):
        meta = json.loads((out / "train" / name / "export" / "cascade.json").read_text())
        assert meta["noise_aug"] == rng and meta["stage"] == 2
    rows = list(csv.DictReader(open(out / "results.csv")))
    models = list(dict.fromkeys(r["model"] for r in rows))
    assert models == ["bilinear upsampling (no model)", "base", "low (aug 0..0)", "high (aug 0..250)"]
    assert len(rows) == 2 + 3 * 2 * 2  # bilinear + 3 models x 2 levels x (1 real + 1 stage I) inputs
    real = [r for r in rows if r["input"] == "real"]
    assert all(r["psnr"] and r["ssim"] and r["hf_ratio"] for r in real)
    assert all(r["psnr"] == "" and r["hf_ratio"] for r in rows if r["input"] == "stage1")
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

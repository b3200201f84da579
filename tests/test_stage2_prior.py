"""Stage II prior preservation: class pairs at 256 come from the frozen stage I -> II cascade."""
from __future__ import annotations

import csv

from PIL import Image

from cascade.cli.main import main


def test_stage2_prior_pairs_from_frozen_cascade(make_cfg, subject_dir, tmp_path):
    cache = make_cfg().models.cache_dir
    out = tmp_path / "run"
    sets = [f"models.cache_dir={cache}", "stage2.train.prior_preservation=true", "stage2.train.num_class_images=2",
            "stage2.train.max_steps=2", "stage2.train.validation_images=0", "stage1.sample.steps=1",
            "stage2.sample.steps=1"]
    assert main(["train", "stage2", "--subject", str(subject_dir), "--class-noun", "dog", "--output", str(out),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    classes = sorted((out / "class_images").glob("*.png"))
    assert len(classes) == 2 and all(Image.open(p).size == (256, 256) for p in classes)
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert len(rows) == 2 and all(float(r["prior_loss"]) > 0 for r in rows)

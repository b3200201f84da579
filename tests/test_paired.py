"""Paired statistics of the SR study (issue 28): variants share seeds, so A - B is taken per seed and
its 95% interval uses Student's t for the number of seeds (never 1.96)."""
from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest

from cascade.evaluation import paired
from cascade.evaluation.sr_study_report import over_seeds, paired_markdown, paired_rows

ROOT = Path(__file__).resolve().parents[1]


def test_t_quantile_matches_the_tables():
    # two-sided 95%: the t table's values for 1, 2, 4, 11 and 30 degrees of freedom
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (11, 2.201), (30, 2.042)):
        assert paired.t975(df) == pytest.approx(value, abs=5e-4)


def _row(seed, model, train_aug, psnr, f1=None, level=250, view="held-out"):
    return {"seed": seed, "view": view, "heldout": view == "held-out", "input": "real", "model": model,
            "train_aug": train_aug, "prior": False, "noise_level": level, "n": 7, "psnr": psnr, "ssim": 0.6,
            "hp_corr": 0.1, "lpips": None, "hf_ratio": 1.0, "dino": None, "freckle_f1": f1}


# the numbers: PSNR varies 2 dB between seeds, aug100 - aug0 is +0.050, +0.028, +0.051 dB
SEEDS = [_row(s, "aug0 (aug 0..0)", "0:0", p) for s, p in enumerate((18.0, 20.0, 16.0))] + \
        [_row(s, "aug100 (aug 100..100)", "100:100", p) for s, p in enumerate((18.050, 20.028, 16.051))] + \
        [_row(s, "base", "pretrained", 16.5) for s in range(3)]


def test_paired_differences_of_known_numbers():
    pairs = paired_rows(SEEDS, (), ("freckle_f1",))
    # the reference is the first variant fine-tuned here, not the base model
    assert [(p["a"], p["b"]) for p in pairs] == [("aug100 (aug 100..100)", "aug0 (aug 0..0)"),
                                                 ("base", "aug0 (aug 0..0)")]
    p = pairs[0]
    assert p["psnr_diffs"] == pytest.approx([0.050, 0.028, 0.051]) and p["seeds"] == [0, 1, 2]
    sd = math.sqrt((0.007 ** 2 + 0.015 ** 2 + 0.008 ** 2) / 2)  # the deviations from the mean 0.043
    assert p["psnr"] == pytest.approx(0.043) and p["psnr_std"] == pytest.approx(sd)
    assert p["psnr_ci95"] == pytest.approx(4.303 * sd / math.sqrt(3), abs=1e-5)
    assert paired.cell(p, "psnr") == "+0.043 [+0.011, +0.075]"
    assert p["freckle_f1"] is None and paired.cell(p, "freckle_f1") == "-"
    # unpaired, the same difference hides inside the seed spread (std 2 dB per model)
    means = {a["model"]: a for a in over_seeds(SEEDS, (), ("freckle_f1",))}
    assert means["aug0 (aug 0..0)"]["psnr_std"] == pytest.approx(2.0)
    md = "\n".join(paired_markdown(pairs, {"readers": [], "truth_readers": ["freckle_f1"]}))
    assert "| aug100 (aug 100..100) - aug0 (aug 0..0) | 250 | 3 | +0.043 [+0.011, +0.075]" in md


def test_interval_over_twelve_seeds_uses_t_not_1_96():
    rows = [_row(s, "base", "pretrained", 16.0 + (s % 2)) for s in range(12)]
    a = over_seeds(rows)[0]
    assert a["psnr_ci95"] == pytest.approx(2.201 * a["psnr_std"] / math.sqrt(12), rel=2e-4)


def test_merge_script_prints_the_paired_table(tmp_path, capsys):
    for s in range(3):
        folder = tmp_path / f"seed{s}"
        folder.mkdir()
        rows = [r for r in SEEDS if r["seed"] == s]
        (folder / "results.json").write_text(json.dumps({"per_seed": rows, "readers": [],
                                                         "truth_readers": ["freckle_f1"]}))
    main = runpy.run_path(str(ROOT / "scripts" / "merge_study_sr.py"))["main"]
    assert main([str(tmp_path / f"seed{s}") for s in range(3)] + ["--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "| aug100 (aug 100..100) - aug0 (aug 0..0) | 250 | 3 | +0.000 [+0.000, +0.000] | +0.043 [+0.011, +0.075] |" in out
    assert "glyph" not in out and "freckle" not in out  # columns no row has are left out
    assert json.loads((tmp_path / "m.json").read_text())["paired"][0]["psnr"] == pytest.approx(0.043)
    # another reference on request
    assert main([str(tmp_path / f"seed{s}") for s in range(3)] + ["--reference", "base"]) == 0
    assert "| aug0 (aug 0..0) - base | 250 | 3 |" in capsys.readouterr().out

"""From the committed toy weights, a short DreamBooth fine-tune (`cascade train stage1 --config toy`)
binds the identifier to the subject: "a [V] toy" samples take the subject's colour and shape, which
the base model (to which the identifier means nothing) almost never draws."""
from __future__ import annotations

import json

import torch

from cascade.cli import main
from cascade.config import load_config
from cascade.toy import measure, world


def test_short_finetune_raises_subject_fidelity(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 threads on a shared 2-core machine
    try:
        subject = measure.write_subject(tmp_path / "subject")
        assert len(list(subject.glob("*.png"))) == len(world.SUBJECT_POSES)
        cache = f"models.cache_dir={tmp_path / 'cache'}"
        out = tmp_path / "ft"
        assert main(["train", "stage1", "--config", "toy", "--subject", str(subject), "--class-noun", "toy",
                     "--output", str(out), "--max-steps", "40", "--set", "stage1.train.prior_preservation=false",
                     "--set", "stage1.train.sample_every=1000", "--set", cache]) == 0
        token = json.loads((out / "export" / "cascade.json").read_text())["identifier"]
        cfg = load_config("toy", [cache, "stage1.sample.steps=20"])
        seeds = list(range(8))
        base = measure.fidelity(measure.sample_prompt(str(world_root()), cfg, f"a {token} toy", seeds))
        tuned = measure.fidelity(measure.sample_prompt(str(out / "export"), cfg, "a [V] toy", seeds))
        assert base <= 0.25, base  # 1 of 24 colour+shape pairs by chance
        assert tuned >= 0.75 and tuned >= base + 0.5, (base, tuned)
    finally:
        torch.set_num_threads(threads)


def world_root():
    from cascade.toy.weights import toy_root

    return toy_root() / "stage1"


def test_study_sr_on_the_toy_world_reads_stripes_and_emblem(tmp_path, one_thread, capsys):
    """`cascade study-sr --config toy` measures the SR detail with the toy world's exact readers; the
    pretrained SR base never draws the emblem (no toy of the class has one), while the true photos do."""
    subject = measure.write_subject(tmp_path / "subject")
    truth = world.to_tensor(world.subject_photos())
    assert measure.detail(truth)["stripes"] == 1.0 and measure.detail(truth)["emblem"] == 1.0
    out = tmp_path / "study"
    assert main(["study-sr", "--config", "toy", "--subject", str(subject), "--class-noun", "toy", "--train",
                 "--variant", "low=0:0", "--max-steps", "2", "--noise-levels", "0,250", "--num-stage1", "1",
                 "--max-images", "3", "--dino", "none", "--output", str(out),
                 "--set", f"models.cache_dir={tmp_path / 'cache'}", "--set", "stage2.sample.steps=10",
                 "--set", "stage2.train.sample_every=1000", "--set", "stage2.train.prior_preservation=false"]) == 0
    rows = json.loads((out / "results.json").read_text())["means"]
    base = [r for r in rows if r["model"] == "base" and r["input"] == "real"]
    assert [r["noise_level"] for r in base] == [0, 250]
    assert all(r["emblem"] == 0.0 and 0.0 <= r["stripes"] <= 1.0 for r in base), base
    assert {r["model"] for r in rows} == {"bilinear upsampling (no model)", "base", "low (aug 0..0)"}
    assert all("stripes" in r and "emblem" in r for r in rows if r["input"] == "stage1")
    table = (out / "table.md").read_text()
    assert "| stripes | emblem |" in table and (out / "plot-real.png").exists()

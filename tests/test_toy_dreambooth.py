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

"""Multi-process sampling (torchrun, gloo on CPU): images are split across ranks and equal a
single-process run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cascade.cli.main import main
from tests.conftest import torchrun

HELPER = Path(__file__).parent / "helpers" / "cli_main.py"


def test_two_process_sampling_matches_one(make_cfg, tmp_path):
    cache = make_cfg().models.cache_dir
    args = ["--prompt", "a dog", "--prompt", "a cat", "--num-images", "2", "--seed", "3",
            "--set", f"models.cache_dir={cache}", "--set", "stage1.sample.steps=2", "--set", "stage2.sample.steps=1",
            "--set", "stage1.sample.batch_size=1", "--set", "stage2.sample.batch_size=1"]
    assert main(["sample", *args, "--output", str(tmp_path / "one")]) == 0
    text = torchrun([HELPER], CASCADE_ARGV=json.dumps(["sample", *args, "--output", str(tmp_path / "two")]))
    assert "process 0/2 samples 2 of 4 images" in text and "process 1/2 samples 2 of 4 images" in text
    for stage in ("stage1", "stage2"):
        one = sorted((tmp_path / "one" / stage).glob("*.png"))
        two = sorted((tmp_path / "two" / stage).glob("*.png"))
        assert [p.name for p in one] == [p.name for p in two] and len(one) == 4
        for a, b in zip(one, two):
            diff = np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)
            assert np.abs(diff).max() <= 1
    assert (tmp_path / "two" / "samples.json").is_file()

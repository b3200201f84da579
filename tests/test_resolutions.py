"""Stage resolutions come from the UNets' sample_size: the same commands train and sample a 16 -> 64
cascade as they do IF's 64 -> 256; stage II's low-res side is stage I's size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cascade import resolutions
from cascade.cli.main import main
from stages import components, data, trainer
from stages.errors import InputError
from tests.conftest import eval_loss

LOW, HIGH = 16, 64
QUICK = ["train.validation_images=1", "train.validation_steps=2", "train.num_class_images=2", "sample.steps=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: far faster on one thread


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Tiny components at 16 -> 64 ("tiny-v1" in the name: commands say their images are noise)."""
    from cascade.offline.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("small") / "tiny-v1-16", with_stage3=False, sizes=(LOW, HIGH))


def _sets(cache_dir, small, stage: str, *extra):
    sets = [f"models.cache_dir={cache_dir}", f"models.stage1={small / 'stage1'}", f"models.stage2={small / 'stage2'}",
            *[f"{stage}.{q}" for q in QUICK], *extra]
    return [a for s in sets for a in ("--set", s)]


def _train(stage: str, subject, out, sets):
    """`cascade train STAGE ...`, keeping what the trainer received."""
    seen = {}
    original = trainer.train

    def spy(task, unet, *args, **kwargs):
        seen.update(task=task, unet=unet)
        return original(task, unet, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "train", spy)
        assert main(["train", stage, "--subject", str(subject), "--class-noun", "dog", "--output", str(out),
                     *sets]) == 0
    seen["unet"].eval()
    return seen


@pytest.fixture(scope="module")
def runs(small, cache_dir, tmp_path_factory):
    from tests.conftest import _write_subject

    root = tmp_path_factory.mktemp("res-runs")
    subject = _write_subject(root / "subject", 3, 80)
    r1 = _train("stage1", subject, root / "r1", _sets(cache_dir, small, "stage1", "stage1.train.max_steps=12",
                                                        "stage1.train.learning_rate=5e-4",
                                                        "stage1.train.sample_every=12"))
    r2 = _train("stage2", subject, root / "r2", _sets(cache_dir, small, "stage2", "stage2.train.max_steps=2",
                                                        "stage2.train.prior_preservation=true",
                                                        "stage2.train.num_class_images=1", "stage1.sample.steps=2"))
    return {"subject": subject, "root": root, "r1": r1, "r2": r2}


def test_stage1_trains_at_its_unet_size(runs, small):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    root, task = runs["root"], runs["r1"]["task"]
    assert task.resolution == LOW and task.instance.shape[-1] == LOW
    assert task.batch(2, True, torch.Generator().manual_seed(0))["x0"].shape == (4, 3, LOW, LOW)
    assert all(Image.open(p).size == (LOW, LOW) for p in (root / "r1" / "class_images").glob("*.png"))
    assert Image.open(root / "r1" / "samples" / "step-000012.png").size == (LOW, LOW)  # one validation image
    meta = json.loads((root / "r1" / "export" / "cascade.json").read_text())
    assert meta["resolution"] == LOW
    # the export reloads with the trained predictions, and training lowered the loss on the subject
    exported = UNet2DConditionModel.from_pretrained(root / "r1" / "export" / "unet").eval()
    x = torch.randn(2, 3, LOW, LOW, generator=torch.Generator().manual_seed(1))
    enc = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = torch.tensor([10, 700])
        assert torch.allclose(exported(x, t, encoder_hidden_states=enc).sample,
                              runs["r1"]["unet"](x, t, encoder_hidden_states=enc).sample, atol=1e-5)
    sched = DDPMScheduler.from_pretrained(small / "stage1", subfolder="scheduler")
    base = UNet2DConditionModel.from_pretrained(small / "stage1", subfolder="unet").eval()
    before, after = eval_loss(base, task.instance, sched, 5), eval_loss(exported, task.instance, sched, 5)
    assert after < 0.9 * before, (before, after)


def test_stage2_upsamples_stage1_size(runs):
    root, task = runs["root"], runs["r2"]["task"]
    assert (task.resolution, task.lowres) == (HIGH, LOW)
    batch = task.batch(1, True, torch.Generator().manual_seed(0))
    assert batch["x0"].shape == (2, 3, HIGH, HIGH) and batch["lowres"].shape == (2, 3, LOW, LOW)
    assert torch.equal(batch["lowres"], data.downsample(batch["x0"], LOW))
    # class pairs for prior preservation come from the frozen 16 -> 64 cascade
    assert [Image.open(p).size for p in (root / "r2" / "class_images").glob("*.png")] == [(HIGH, HIGH)]
    meta = json.loads((root / "r2" / "export" / "cascade.json").read_text())
    assert (meta["resolution"], meta["lowres_size"]) == (HIGH, LOW)


def test_sample_through_the_small_cascade(runs, small, cache_dir, tmp_path):
    out = tmp_path / "samples"
    root = runs["root"]
    assert main(["sample", "--prompt", "a [V] dog", "--num-images", "2", "--stage1", str(root / "r1" / "export"),
                 "--stage2", str(root / "r2" / "export"), "--output", str(out),
                 *_sets(cache_dir, small, "stage1", "stage2.sample.steps=2")]) == 0
    assert [Image.open(out / "stage1" / f"{i:05d}.png").size for i in range(2)] == [(LOW, LOW)] * 2
    assert [Image.open(out / "stage2" / f"{i:05d}.png").size for i in range(2)] == [(HIGH, HIGH)] * 2
    assert json.loads((out / "samples.json").read_text())["random_weights"] is True


def test_mismatched_cascade_refused(runs, tiny, cache_dir, tmp_path, capsys):
    """A stage II export trained on 16px inputs behind IF-sized (64px) stage I: one clear line, no output."""
    out = tmp_path / "o"
    code = main(["sample", "--prompt", "a dog", "--num-images", "1", "--stage1", str(tiny / "stage1"),
                 "--stage2", str(runs["root"] / "r2" / "export"), "--output", str(out),
                 "--set", f"models.cache_dir={cache_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "trained to upsample 16px" in err and "makes 64px" in err
    assert not out.exists()


def test_lowres_size_rule(runs, small, tiny, tmp_path):
    export = str(runs["root"] / "r2" / "export")
    assert resolutions.stage2_sizes(str(tiny / "stage2"), str(tiny / "stage1")) == (256, 64)  # IF's sizes
    assert resolutions.stage2_sizes(str(small / "stage2"), str(small / "stage1")) == (HIGH, LOW)
    missing = str(tmp_path / "no-stage1")
    assert resolutions.stage2_sizes(export, missing) == (HIGH, LOW)  # from the export's metadata
    assert resolutions.stage2_sizes(str(tiny / "stage2"), missing) == (256, 64)  # IF's 4x rule
    with pytest.raises(InputError, match="cannot upsample"):
        resolutions.stage2_sizes(str(small / "stage2"), str(tiny / "stage2"))  # 256px "stage I" above 64px
    assert components.stage_resolution(str(small / "stage1"), "x") == LOW


def test_build_tiny_sizes_checked(tmp_path, capsys):
    assert main(["build-tiny", "--output", str(tmp_path / "t"), "--sizes", "64:60"]) == 2
    assert "64:60" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert main(["build-tiny", "--output", str(tmp_path / "t"), "--sizes", "sixteen"]) == 2
    assert "--sizes" in capsys.readouterr().err

"""The SR study's positive control (issue 28): a stand-in SR model that copies its condition passes it,
one that ignores its condition fails it and is labelled "cannot show a noise effect" in the tables."""
from __future__ import annotations

import pytest
import torch

from cascade.evaluation import sr_control
from cascade.toy import world


@pytest.fixture(scope="module")
def schedulers():
    from diffusers import DDPMScheduler

    from cascade.toy.weights import WEIGHTS

    return (DDPMScheduler.from_pretrained(WEIGHTS / "stage2" / "scheduler"),
            DDPMScheduler.from_pretrained(WEIGHTS / "stage2" / "image_noising_scheduler"))


class Stand(torch.nn.Module):
    """An SR 'model' whose x0 estimate is its condition (copy) or a flat grey image (ignore), written as
    the v (or epsilon) that yields that x0 at every timestep."""

    def __init__(self, copy: bool, ab: torch.Tensor, v: bool = True):
        super().__init__()
        self.copy, self.ab, self.v = copy, ab, v
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def forward(self, inp, t, encoder_hidden_states, class_labels, return_dict):
        xt, cond = inp[:, :3], inp[:, 3:]
        a = self.ab[t].view(-1, 1, 1, 1)
        x0 = cond if self.copy else torch.zeros_like(cond)
        out = (a.sqrt() * xt - x0) / (1 - a).sqrt() if self.v else (xt - a.sqrt() * x0) / (1 - a).sqrt()
        return (torch.cat([out, torch.zeros_like(out)], 1),)


def _photos(n=3):
    toys, hi = world.dataset(n, 123)
    return hi


def test_condition_read_of_a_copying_and_a_blind_stand_in(schedulers):
    sched, noising = schedulers
    photos, emb = _photos(), torch.zeros(3, 77, 32)
    ab = sched.alphas_cumprod
    copy = sr_control.condition_read(Stand(True, ab), sched, noising, emb, photos, world.LO)
    blind = sr_control.condition_read(Stand(False, ab), sched, noising, emb, photos, world.LO)
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in copy["shares"].values())  # t = 300, 500, 999
    assert all(abs(v) < 1e-4 for v in blind["shares"].values())
    # an epsilon-prediction model is read through its own parameterisation
    eps = type(sched).from_config({**sched.config, "prediction_type": "epsilon"})
    by_eps = sr_control.condition_read(Stand(True, ab, v=False), eps, noising, emb, photos, world.LO)
    assert by_eps["read"] == pytest.approx(1.0, abs=1e-3)
    assert set(by_eps["shares"]) == {300, 500}  # at t = 999 alpha_bar is 2e-9: an epsilon model's x0 is no read
    # the marks are faint single low-res pixels, inside the image and away from the border
    low = world.to_lowres(photos)
    d = sr_control.add_marks(low) - low
    assert ((d.mean(1) < 0).sum((1, 2)) == sr_control.MARKS).all() and d.min() == pytest.approx(sr_control.MARK)


def test_level_effect_and_labels_in_the_table(schedulers):
    from cascade.evaluation.sr_study_report import markdown
    from stages.sampling import sample

    sched, noising = schedulers
    lowres = world.to_lowres(_photos())
    emb = torch.zeros(3, 77, 32)

    def run(model, level):
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        return sample(model, sched, emb, emb[:1], 3, 4.0, gens, world.HI, lowres=lowres, noise_level=level,
                      noising_scheduler=noising)

    ab = sched.alphas_cumprod
    copy, blind = Stand(True, ab), Stand(False, ab)
    eff_copy = sr_control.level_effect(run(copy, 0), run(copy, 250))
    eff_blind = sr_control.level_effect(run(blind, 0), run(blind, 250))
    assert eff_copy > 0.5 and abs(eff_blind) < 1e-6
    controls = [{"seed": 0, "model": "copy", "read": 1.0, "shares": {300: 1.0}, "level_effect": eff_copy,
                 "levels": [0, 250], "verdict": sr_control.verdict(1.0, eff_copy)},
                {"seed": 0, "model": "blind", "read": 0.0, "shares": {300: 0.0}, "level_effect": eff_blind,
                 "levels": [0, 250], "verdict": sr_control.verdict(0.0, eff_blind)}]
    assert [c["verdict"] for c in controls] == ["reads its condition", sr_control.CANNOT]
    assert sr_control.verdict(0.0, eff_copy) == "level effect only"
    agg = [{"view": "held-out", "heldout": True, "input": "real", "model": m, "train_aug": "given", "prior": False,
            "noise_level": 0, "n_seeds": 1, "n": 3, **{k: 0.5 for k in ("psnr", "ssim", "hp_corr", "hf_ratio")},
            **{k + "_std": None for k in ("psnr", "ssim", "hp_corr", "lpips", "hf_ratio", "dino")},
            "lpips": None, "dino": None} for m in ("copy", "blind")]
    info = {"subject": "s", "prompt": "a [V] toy", "resolutions": [16, 64], "seeds": [0], "training_photos": [],
            "heldout_photos": [0], "fresh_views": 0, "dino": "DINO: none", "lpips": "none", "random_weights": False,
            "dino_random": False, "readers": [], "truth_readers": [], "controls": controls}
    table = markdown(agg, info, [])
    assert "| blind (cannot show a noise effect) | given | 0 |" in table
    assert "| copy | given | 0 |" in table and "| copy (cannot" not in table
    assert "| blind | 0 | 300: +0.000 | 0.000 (0 vs 250) | cannot show a noise effect |" in table

"""The subject's freckles: detail only the low-res view can place (issue 18's premise), and the
placement metric that reads it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers.stand_sr import StandSR, zero_embed
from cascade.toy import freckles, world


@pytest.fixture(scope="module")
def noising():
    from diffusers import DDPMScheduler

    from cascade.toy.weights import WEIGHTS

    return DDPMScheduler.from_pretrained(WEIGHTS / "stage2" / "image_noising_scheduler")


def test_freckles_differ_per_photo_and_never_on_class_toys():
    toys = world.subject_toys()
    assert all(len(t.freckles) == world.FRECKLES for t in toys)
    rel = [tuple((round(x - t.cx), round(y - t.cy)) for x, y in t.freckles) for t in toys]
    assert len(set(rel)) == len(rel)  # not a fixed pattern riding on the pose
    class_toys, _ = world.dataset(40, seed=0, specks=0.5)
    assert not any(t.freckles for t in class_toys)
    assert any(t.specks for t in class_toys)


def test_specks_leave_the_toys_unchanged():
    plain, a = world.dataset(12, seed=5)
    specked, b = world.dataset(12, seed=5, specks=1.0)
    assert [dataclasses.replace(t, specks=()) for t in specked] == plain
    assert all(t.specks for t in specked) and not torch.equal(a, b)


def test_detector_reads_truth_and_finds_nothing_without_freckles():
    toys = world.fresh_subject_toys(8, 3)
    hi = world.to_tensor([world.render(t) for t in toys])
    clean = world.to_tensor([world.render(dataclasses.replace(t, freckles=())) for t in toys])
    assert sum(freckles.score(h, t)["freckle_f1"] for h, t in zip(hi, toys)) / len(toys) > 0.9
    assert all(not freckles.detect(c, freckles.interior(t)) for c, t in zip(clean, toys))
    # the image-only mask (no pose known) finds the same dots
    assert sum(freckles.f1(freckles.detect(h, freckles.object_mask(h)), list(t.freckles))
               for h, t in zip(hi, toys)) / len(toys) > 0.9


def test_bilinear_upsampling_does_not_show_freckles():
    from stages.noise_aug import upsample

    toys = world.fresh_subject_toys(8, 4)
    up = upsample(world.to_lowres(world.to_tensor([world.render(t) for t in toys])), world.HI)
    assert all(freckles.score(u, t)["freckle_f1"] == 0.0 for u, t in zip(up, toys))


def test_placement_metric_ranks_correct_above_shifted():
    toy = world.fresh_subject_toys(1, 7)[0]
    truth = list(toy.freckles)
    assert freckles.f1(truth, truth) == 1.0
    assert freckles.f1([(x + 4.0, y) for x, y in truth], truth) == 0.0  # one 16 px pixel off
    r = 3 / len(truth)  # half the dots found, none wrong: precision 1
    assert freckles.f1(truth[:3], truth) == pytest.approx(2 * r / (1 + r))
    right = world.to_tensor([world.render(toy)])[0]
    shifted = world.to_tensor([world.render(dataclasses.replace(toy, freckles=tuple((x + 4.0, y) for x, y in
                                                                                     toy.freckles)))])[0]
    assert freckles.score(right, toy)["freckle_f1"] > 0.8
    assert freckles.score(shifted, toy)["freckle_f1"] < 0.3


def test_premise_oracle_places_freckles_at_low_levels_not_at_250(noising):
    """Fails on a world whose detail is a fixed function of coarse content (no per-photo freckles)."""
    toys = world.fresh_subject_toys(16, 0)
    mean = {lv: sum(freckles.oracle(toys, lv, noising, seed=1)) / len(toys) for lv in (0, 20, 250)}
    assert mean[0] > 0.9 and mean[20] > 0.9
    assert mean[250] < 0.5 and mean[250] < mean[20] - 0.4


def test_high_pass_correlation_sees_placement():
    from cascade.evaluation.image_metrics import hp_correlation

    toy = world.fresh_subject_toys(1, 7)[0]
    truth = world.to_tensor([world.render(toy)])[0]
    shifted = world.to_tensor([world.render(dataclasses.replace(toy, freckles=tuple((x + 4.0, y) for x, y in
                                                                                     toy.freckles)))])[0]
    none = world.to_tensor([world.render(dataclasses.replace(toy, freckles=()))])[0]
    assert hp_correlation(truth, truth) == pytest.approx(1.0)
    assert hp_correlation(truth, truth) > hp_correlation(shifted, truth) and hp_correlation(none, truth) < 1.0


def test_toy_specks_put_dots_on_the_toy_and_keep_the_background_ones():
    plain, _ = world.dataset(12, seed=5, specks=1.0)
    both, _ = world.dataset(12, seed=5, specks=1.0, toy_specks=True)
    assert [dataclasses.replace(t, freckles=()) for t in both] == plain
    for t in both:  # 1..6 dots, each on the toy
        cov = world.coverage(t.shape, t.cx, t.cy, t.size, world.HI)
        assert 1 <= len(t.freckles) <= 6 and all(cov[int(y), int(x)] > 0.99 for x, y in t.freckles)


def test_speck_weight_map_covers_every_dot_and_only_low_levels():
    """The pretraining's speck weighting: the map is 1 within the radius of each dot (and only there),
    and the weighted error is zero for an exact prediction and grows with the error inside the map."""
    from cascade.toy.pretrain import _weighted_error, speck_weights
    from stages.losses import DiffusionMath

    toys, _ = world.dataset(6, seed=2, specks=1.0, toy_specks=True)
    w = speck_weights(toys, 4.5)
    for t, m in zip(toys, w[:, 0]):
        dots = (*t.specks, *t.freckles)
        assert all(m[int(y), int(x)] == 1 for x, y in dots)
        assert m.sum() <= len(dots) * 3.15 * 5.5 ** 2 and m.sum() >= 3.0 * 4.0 ** 2
    betas = torch.linspace(1e-4, 2e-2, 1000)
    math_ = DiffusionMath(torch.cumprod(1 - betas, 0))

    class Eps:
        prediction_type = "epsilon"

    noise = torch.randn(6, 3, 64, 64)
    exact = torch.cat([noise, torch.zeros(6, 3, 64, 64)], 1)
    t = torch.full((6,), 500)
    assert _weighted_error(math_, exact, noise, noise, t, w.float(), Eps).abs().max() == 0
    off_map = exact.clone()
    off_map[:, :3] += 1 - w.float()  # wrong only where the map is 0
    assert _weighted_error(math_, off_map, noise, noise, t, w.float(), Eps).abs().max() == 0
    on_map = exact.clone()
    on_map[:, :3] += w.float()
    assert (_weighted_error(math_, on_map, noise, noise, t, w.float(), Eps) > 0).all()


def test_condition_sensitivity_tells_a_model_that_copies_its_condition_from_one_that_ignores_it(noising):
    """The gate for "can this SR read a faint dot at all": a stand-in UNet whose x0 estimate is its
    condition reads the specks exactly as the condition shows them; one whose estimate ignores the
    condition reads nothing."""
    from diffusers import DDPMScheduler

    from cascade.toy.weights import WEIGHTS

    scheduler = DDPMScheduler.from_pretrained(WEIGHTS / "stage2" / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    ab = scheduler.alphas_cumprod

    copy = freckles.condition_sensitivity(StandSR(ab, True), scheduler, noising, zero_embed, 6)
    ignore = freckles.condition_sensitivity(StandSR(ab, False), scheduler, noising, zero_embed, 6)
    assert copy["condition"] < -0.02  # the specks darken the level-0 condition
    for t in (300, 500, 700):
        assert copy[t] == pytest.approx(copy["condition"], abs=1e-4)
        assert abs(ignore[t]) < 1e-5


def test_the_f1_reference_misses_one_freckle_on_three_of_seven_truths():
    """The issue 18 SR study scored freckle F1 against the dots the detector finds in the truth. On the study's 7 held-out truths (photo 5 and 6 fresh views) that
    reference misses one of the 6 freckles on 3 of them: its own F1 against the true positions, the
    ceiling docs/sr-study.md states, is 0.96."""
    from cascade.toy.measure import FRESH_VIEWS

    toys = [world.subject_toys()[4]] + world.fresh_subject_toys(FRESH_VIEWS, 1)
    ims = world.to_tensor([world.render(t) for t in toys])
    found = [freckles.detect(im, freckles.object_mask(im)) for im in ims]
    scores = [freckles.f1(f, list(t.freckles)) for f, t in zip(found, toys)]
    assert sorted(len(f) for f in found) == [5, 5, 5, 6, 6, 6, 6] and all(len(t.freckles) == 6 for t in toys)
    assert sum(scores) / len(scores) == pytest.approx(0.961, abs=1e-3)

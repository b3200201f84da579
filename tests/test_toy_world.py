"""The toy world: deterministic generator, exact readers, a real tokenizer, v-prediction math,
a pretraining that learns and resumes exactly, and checksum-checked weights."""
from __future__ import annotations

import random

import pytest
import torch

from cascade.toy import readers, world
from stages.errors import InputError


def test_generator_is_deterministic_from_its_seed():
    toys_a, a = world.dataset(6, seed=3)
    toys_b, b = world.dataset(6, seed=3)
    _, c = world.dataset(6, seed=4)
    assert toys_a == toys_b and torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (6, 3, world.HI, world.HI) and a.min() >= -1 and a.max() <= 1


def test_readers_recover_known_attributes_exactly():
    rng = random.Random(11)
    toys = [world.random_toy(rng, colour=c, shape=s, pattern=p, emblem=(i % 4 == 0))
            for i, (c, s, p) in enumerate((c, s, p) for c in world.COLOURS for s in world.SHAPES for p in world.PATTERNS)
            if i % 2 == 0]  # 36 toys covering every colour, shape and pattern
    for toy in toys:
        img = world.render(toy)
        assert readers.read(img) == {"colour": toy.colour, "shape": toy.shape, "pattern": toy.pattern,
                                     "emblem": toy.emblem}, toy
        low = world.to_lowres(world.to_tensor([img]))[0]
        assert readers.read(low) == {"colour": toy.colour, "shape": toy.shape}, toy


def test_pattern_is_lost_at_stage_one_resolution():
    """The fine detail only stage II can carry: bilinear upsampling of the 16 px view loses it."""
    from stages.noise_aug import upsample

    rng = random.Random(2)
    toys = [world.random_toy(rng, pattern=p) for p in ("striped", "dotted") for _ in range(6)]
    up = upsample(world.to_lowres(world.to_tensor([world.render(t) for t in toys])), world.HI)
    assert sum(readers.read_pattern(u) == t.pattern for u, t in zip(up, toys)) <= 3


def test_subject_has_an_emblem_the_class_never_shows():
    photos = world.subject_photos()
    assert len(photos) == 5 and len({p.tobytes() for p in photos}) == 5
    for p in photos:
        assert readers.read(p) == {**world.SUBJECT, "emblem": True}
    _, imgs = world.dataset(20, seed=0)
    assert not any(readers.read_emblem(im) for im in imgs)


def test_grammar_captions_and_tokenizer(tmp_path):
    from cascade.toy import build

    caps = world.all_captions()
    assert len(set(caps)) == 140 and "a toy" in caps and "a striped red square toy" in caps
    toy = world.Toy("red", "square", "striped", 32, 32, 30)
    rng = random.Random(0)
    for _ in range(20):
        words = set(world.training_caption(toy, rng).split())
        assert words <= {"a", "red", "square", "striped", "toy"} and {"a", "toy"} <= words
    tok = build.build_tokenizer(tmp_path / "tok")
    ids = {w: tok(f"a {w} toy").input_ids for w in [*world.COLOURS, *world.SHAPES, *world.PATTERNS]}
    assert len({tuple(v) for v in ids.values()}) == len(ids)
    assert all(tok.unk_token_id not in v for v in ids.values())


def test_v_prediction_round_trip():
    from diffusers import DDPMScheduler

    from stages.losses import DiffusionMath, diffusion_loss

    m = DiffusionMath(DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 300, 990, 999])
    xt = m.q_sample(x0, noise, t)
    v = m.v_target(x0, noise, t)
    assert torch.allclose(m.eps_from_v(xt, v, t), noise, atol=1e-4)
    perfect = torch.cat([v, torch.zeros_like(v)], 1)
    assert diffusion_loss(m, perfect, x0, xt, noise, t, "epsilon", prediction_type="v_prediction").max() < 1e-8
    assert diffusion_loss(m, perfect, x0, xt, noise, t, "epsilon")[1:].min() > 1e-3  # read as epsilon: wrong


def test_short_pretraining_lowers_loss_and_resumes_exactly(tmp_path):
    from cascade.toy.pretrain import PretrainConfig, prepare, pretrain

    cfg = PretrainConfig(stage=1, steps=16, batch_size=6, warmup_steps=4, pool_size=24, ckpt_every=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as pretrain does; the suite's default is restored below
    try:
        _pretrain_twice(tmp_path, cfg, prepare, pretrain, PretrainConfig)
    finally:
        torch.set_num_threads(threads)


def _pretrain_twice(tmp_path, cfg, prepare, pretrain, PretrainConfig):
    import shutil

    prepare(tmp_path / "a", cfg.seed)  # tokenizer, T5, random UNets and caption embeddings, built once
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    losses = pretrain(tmp_path / "a", cfg, progress=False)
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:2]) / 2
    with pytest.raises(InputError, match="--resume"):
        pretrain(tmp_path / "a", cfg, progress=False)
    pretrain(tmp_path / "b", PretrainConfig(**{**cfg.__dict__, "steps": 8}), progress=False)
    ckpt = tmp_path / "b" / "ckpt-stage1.pt"
    state = torch.load(ckpt, weights_only=True)
    for key in ("toy_specks", "speck_weight", "speck_radius", "speck_max_level"):  # made before these options
        del state["config"][key]
    torch.save(state, ckpt)
    rest = pretrain(tmp_path / "b", cfg, resume=True, progress=False)
    assert len(rest) == 8 and rest == pytest.approx(losses[8:], rel=1e-5)
    a, b = (torch.load(d / "ckpt-stage1.pt", weights_only=True)["ema"] for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_speck_weight_adds_to_the_stage2_loss(tmp_path, one_thread):
    """The same step with and without the speck weighting: the same batch, a larger loss with it."""
    import shutil

    from cascade.toy.pretrain import PretrainConfig, prepare, pretrain

    base = dict(stage=2, steps=2, batch_size=4, warmup_steps=1, pool_size=8, specks=1.0, toy_specks=True,
                speck_max_level=500)
    prepare(tmp_path / "a", 0)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    plain = pretrain(tmp_path / "a", PretrainConfig(**base), progress=False)
    weighted = pretrain(tmp_path / "b", PretrainConfig(**base, speck_weight=20.0), progress=False)
    assert weighted[0] > plain[0] * 1.01


def test_checksum_check_rejects_a_modified_weight_file(tmp_path):
    from cascade.toy import weights

    root = tmp_path / "w"
    (root / "stage1" / "unet").mkdir(parents=True)
    f = root / "stage1" / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(b"\x00" * 64)
    weights.write_sums(root)
    assert weights.verify(root) == root
    f.write_bytes(b"\x00" * 63 + b"\x01")
    with pytest.raises(InputError, match="diffusion_pytorch_model.safetensors does not match its sha256"):
        weights.verify(root)
    f.unlink()
    with pytest.raises(InputError, match="missing"):
        weights.verify(root)


def test_committed_weights_pass_their_checksums():
    from cascade.toy import weights

    if not (weights.WEIGHTS / weights.SUMS).is_file():
        pytest.fail("no committed toy weights")
    assert (weights.toy_root() / "stage1" / "model_index.json").is_file()


def test_low_levels_and_high_t_move_the_stage2_examples_where_the_condition_shows_marks(tmp_path, one_thread,
                                                                                        monkeypatch):
    """--low-levels 1 puts every augmentation level in 0..20, --high-t 1 every timestep in the upper half,
    and --marks 1 marks the pool's toys (issue 28, gate 2's recipe); without them both span their ranges."""
    from diffusers import UNet2DConditionModel

    from cascade.toy.pretrain import LOW_LEVEL_MAX, PretrainConfig, pretrain

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, *a, class_labels=None, **k):
        seen.append((timestep.clone(), class_labels.clone()))
        return forward(self, sample, timestep, *a, class_labels=class_labels, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    base = dict(stage=2, steps=2, batch_size=16, warmup_steps=1, pool_size=8, marks=1.0)
    pretrain(tmp_path / "a", PretrainConfig(**base, low_levels=1.0, high_t=1.0), progress=False)
    t = torch.cat([s[0] for s in seen])
    lv = torch.cat([s[1] for s in seen])
    assert int(lv.max()) <= LOW_LEVEL_MAX and int(t.min()) >= 500
    seen.clear()
    pretrain(tmp_path / "b", PretrainConfig(**base), progress=False)
    t = torch.cat([s[0] for s in seen])
    lv = torch.cat([s[1] for s in seen])
    assert int(lv.max()) > LOW_LEVEL_MAX and int(t.min()) < 500

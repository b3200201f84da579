"""Caption dropout (train.caption_dropout): dropped rows are exactly the empty prompt's embedding,
at the configured rate, repeatably per seed; in training they reach the UNet (and so the loss)."""
from __future__ import annotations

import pytest
import torch

from cascade.config import ConfigError, Train, load_config
from stages import data, trainer
from stages.caption_dropout import drop_captions
from stages.stage1 import Stage1Task


def _embeds(seed=0, n=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 77, 32, generator=g) for _ in range(3)]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropped_rows_are_the_empty_embedding_at_the_rate(p):
    text, empty = torch.randn(20000, 4, 3), torch.randn(1, 4, 3)
    out, mask = drop_captions(text, empty, p, torch.Generator().manual_seed(1))
    assert abs(mask.float().mean().item() - p) < 0.02  # binomial sd ~0.0035
    assert torch.equal(out[mask], empty.expand(int(mask.sum()), -1, -1))
    assert torch.equal(out[~mask], text[~mask])
    again, mask2 = drop_captions(text, empty, p, torch.Generator().manual_seed(1))
    assert torch.equal(mask, mask2) and torch.equal(out, again)  # seeded
    assert drop_captions(text, empty, 0.0, torch.Generator())[0] is text  # off: untouched, nothing drawn


def test_dropped_captions_reach_the_unet_in_training(tiny, subject_dir, tmp_path, one_thread, monkeypatch):
    """Also checks that train.snr_gamma reaches the loss the trainer computes (test_min_snr.py checks the math)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    losses = []
    real_loss = trainer.diffusion_loss

    def recording_loss(*args, **kwargs):
        losses.append(kwargs.get("snr_gamma"))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "diffusion_loss", recording_loss)

    unet = UNet2DConditionModel.from_pretrained(tiny / "stage1", subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(tiny / "stage1", subfolder="scheduler")
    seen = []
    unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].detach().clone()),
                                   with_kwargs=True)
    instance, negative, prior = _embeds()
    task = Stage1Task(data.stack(data.load_folder(subject_dir, 64)[:2], 64))
    cfg = Train(max_steps=4, batch_size=2, prior_preservation=False, validation_images=0, sample_every=100,
                checkpoint_every=100, caption_dropout=0.5, learning_rate=1e-4, snr_gamma=5.0)
    trainer.train(task, unet, scheduler, trainer.Embeddings(instance, negative, prior), cfg, tmp_path / "run",
                  {"base": "tiny"})
    rows = torch.cat(seen)
    assert rows.shape[0] == 8
    is_empty = torch.tensor([torch.equal(r, negative[0]) for r in rows])
    is_instance = torch.tensor([torch.equal(r, instance[0]) for r in rows])
    assert bool((is_empty ^ is_instance).all())  # every row is one or the other, exactly
    assert 0 < int(is_empty.sum()) < 8  # some dropped, some kept (p = 0.5, seeded)
    assert losses == [5.0] * 4


def test_probability_is_checked():
    with pytest.raises(ConfigError, match="stage1.train.caption_dropout"):
        load_config("tiny", ["stage1.train.caption_dropout=1.0"])

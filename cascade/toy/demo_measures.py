"""The toy demo's numbers: what the readers see in the before/after samples of `cascade demo`.

- subject fidelity: "a [V] toy" stage I samples with the subject's colour+shape, base vs fine-tuned;
- drift: "a toy" stage I samples that took the subject's colour+shape, and their entropy (diversity);
- SR detail on held-out views (new renders of the subject with its glyph placed anew, never trained
  on): upsampled by SR base, SR fine-tuned at the config's (low) noise augmentation and at HIGH_AUG:
  the glyph's placement (hit) and drawing against the truth (cascade/toy/glyph_read.py), stripes and
  emblem read.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from cascade.toy import glyph, glyph_read, measure, readers, world
from stages import data


def _load(folder: Path, idx: list[int]) -> torch.Tensor:
    return world.to_tensor([Image.open(folder / f"{i:05d}.png").convert("RGB") for i in idx])


HIGH_AUG = (500, 500)  # the study's high level: the glyph oracle finds nothing there (docs/sr-study.md, gate 1)
HELD_OUT_VIEWS = 4


def high_aug_config(cfg):
    """The demo's stage II settings with training augmentation HIGH_AUG; the export samples at the top of
    its training range (stage2.sample.noise_level -1)."""
    import dataclasses

    # only its export is compared: it validates and checkpoints once, at the end (the same training steps)
    t = dataclasses.replace(cfg.stage2.train, noise_aug_min=HIGH_AUG[0], noise_aug_max=HIGH_AUG[1],
                            sample_every=cfg.stage2.train.max_steps, checkpoint_every=cfg.stage2.train.max_steps)
    out = dataclasses.replace(cfg)
    out.stage2 = dataclasses.replace(cfg.stage2, train=t, sample=dataclasses.replace(cfg.stage2.sample, noise_level=-1))
    return out


def _sr_views(cfg, path: str, prompt: str, encoder, lo: torch.Tensor) -> torch.Tensor:
    from cascade import runner

    emb = encoder.encode([prompt, ""])
    return runner.run_stage2(path, cfg, lo, emb[prompt].expand(len(lo), -1, -1), emb[""], list(range(len(lo))))


def measure_demo(root: Path, cfg, base, tuned, prompts: list[str], n: int, encoder, tuned_high: str) -> dict:
    """prompts = ["a <token> toy", "a toy"], sampled n times each into root/samples-{before,after}."""
    out = {"images_per_prompt": n}
    for name in ("before", "after"):
        folder = root / f"samples-{name}"
        inst, cls = _load(folder / "stage1", list(range(n))), _load(folder / "stage1", list(range(n, 2 * n)))
        out[name] = {"subject_fidelity": measure.fidelity(inst), **{f"class_{k}": v for k, v in measure.drift(cls).items()}}
        if (folder / "stage2").is_dir():
            out[name]["instance_sr_detail"] = measure.detail(_load(folder / "stage2", list(range(n))))
    truth = world.to_tensor([world.render(t) for t in glyph.subject_views(HELD_OUT_VIEWS, 2)])
    low = world.to_lowres(truth)
    lo_aug = (cfg.stage2.train.noise_aug_min, cfg.stage2.train.noise_aug_max)
    sr, ups = {}, []
    for name, path in (("base", base.stage2), ("fine-tuned low", tuned.stage2), ("fine-tuned high", tuned_high)):
        images = _sr_views(cfg, path, prompts[0], encoder, low)
        reads = {k: [fn(im, gt) for im, gt in zip(images, truth)]
                 for k, fn in (("glyph_hit", glyph_read.glyph_hit), ("glyph_drawn", glyph_read.glyph_drawn))}
        sr[name] = {**measure.detail(images), **{k: sum(v) / len(v) for k, v in reads.items()}}
        ups.append(images)
    sr["fine-tuned low"]["noise_aug"], sr["fine-tuned high"]["noise_aug"] = list(lo_aug), list(HIGH_AUG)
    rows = [readers.to_pil(x) for x in torch.cat([torch.nn.functional.interpolate(low, size=world.HI, mode="nearest"),
                                                   *ups, truth])]
    data.grid([r.resize((128, 128), 0) for r in rows], len(low)).save(root / "sr-subject.png")
    out["sr_heldout_views"] = sr
    return out

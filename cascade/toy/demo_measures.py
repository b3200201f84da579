"""The toy demo's numbers: what the readers see in the before/after samples of `cascade demo`.

- subject fidelity: "a [V] toy" stage I samples with the subject's colour+shape, base vs fine-tuned;
- drift: "a toy" stage I samples that took the subject's colour+shape, and their entropy (diversity);
- SR detail: the subject's 16 px views upsampled by SR base vs fine-tuned: stripes and emblem read.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from cascade.toy import measure, readers, world
from stages import data


def _load(folder: Path, idx: list[int]) -> torch.Tensor:
    return world.to_tensor([Image.open(folder / f"{i:05d}.png").convert("RGB") for i in idx])


def _sr_subject(cfg, path: str, prompt: str, encoder) -> torch.Tensor:
    from cascade import runner

    hi = world.to_tensor(world.subject_photos())
    lo = world.to_lowres(hi)
    emb = encoder.encode([prompt, ""])
    return runner.run_stage2(path, cfg, lo, emb[prompt].expand(len(lo), -1, -1), emb[""], list(range(len(lo))))


def measure_demo(root: Path, cfg, base, tuned, prompts: list[str], n: int, encoder) -> dict:
    """prompts = ["a <token> toy", "a toy"], sampled n times each into root/samples-{before,after}."""
    out = {"images_per_prompt": n}
    for name in ("before", "after"):
        folder = root / f"samples-{name}"
        inst, cls = _load(folder / "stage1", list(range(n))), _load(folder / "stage1", list(range(n, 2 * n)))
        out[name] = {"subject_fidelity": measure.fidelity(inst), **{f"class_{k}": v for k, v in measure.drift(cls).items()}}
        if (folder / "stage2").is_dir():
            out[name]["instance_sr_detail"] = measure.detail(_load(folder / "stage2", list(range(n))))
    sr = {}
    ups = []
    for name, path in (("base", base.stage2), ("fine-tuned", tuned.stage2)):
        images = _sr_subject(cfg, path, prompts[0], encoder)
        sr[name] = measure.detail(images)
        ups.append(images)
    low = world.to_lowres(world.to_tensor(world.subject_photos()))
    rows = [readers.to_pil(x) for x in torch.cat([torch.nn.functional.interpolate(low, size=world.HI, mode="nearest"),
                                                   *ups, world.to_tensor(world.subject_photos())])]
    data.grid([r.resize((128, 128), 0) for r in rows], len(low)).save(root / "sr-subject.png")
    out["sr_subject_views"] = sr
    return out

"""Live DreamBooth measures on the toy world, read at each validation of a training run (the readers
are exact on the world's own images; see cascade/toy/measure.py).

Stage I ("a [V] toy" and "a toy" samples, 16 px or upsampled to 64 px):
  fidelity  = share of "a [V] toy" samples with the subject's colour and shape;
  drift     = share of "a toy" samples with the subject's colour and shape (PRES-style: the class
              turning into the subject; the base model draws it for ~6 % of seeds);
  diversity = entropy (bits) of the (colour, shape) pairs of the "a toy" samples (uniform: 4.58).
Stage II (held-out subject photos and "a toy" samples, upsampled to 64 px):
  fidelity  = share of the subject's upsamples showing its stripes; emblem = its centre spot;
  drift     = share of the class upsamples painted with the subject's stripes although they are not
              the subject's colour and shape;
  diversity as above.
"""
from __future__ import annotations

import torch

from cascade.toy import measure, readers, world
from cascade.validation import Measures


def _stage1(subject: torch.Tensor, klass: torch.Tensor) -> dict:
    return {"fidelity": measure.fidelity(subject), "drift": measure.fidelity(klass),
            "diversity_bits": measure.entropy(klass)}


def _striped(img) -> bool:
    return readers.read(img).get("pattern") == world.SUBJECT["pattern"]


def _stage2(subject: torch.Tensor, klass: torch.Tensor) -> dict:
    d = measure.detail(subject)
    out = {"fidelity": d["stripes"], "emblem": d["emblem"]}
    if len(klass):  # stage II chained with stage I's class samples
        others = [im for im in klass if not measure.is_subject(im)]
        out["drift"] = sum(_striped(im) for im in others) / len(others) if others else float("nan")
        out["diversity_bits"] = measure.entropy(klass)
    return out


def measures(stage: int, with_class: bool = True) -> Measures:
    """`with_class`: the validation has "a toy" samples (stage I always; stage II when chained)."""
    if stage == 1:
        return Measures(("fidelity", "drift", "diversity_bits"), _stage1, "toy readers (colour + shape)")
    names = ("fidelity", "emblem") + (("drift", "diversity_bits") if with_class else ())
    return Measures(names, _stage2, "toy readers (stripes, emblem)")

"""Which live validation measures a training run gets (handed to the core in TrainRequest.measures):
the toy world's readers when the stage's model is the toy cascade (or an export of it), else DINO /
CLIP-I when those models are in the local cache, else none."""
from __future__ import annotations

from pathlib import Path

from cascade.config import Config
from cascade.validation import Measures
from stages import components


def _is_toy(name: str) -> bool:
    from cascade.toy.weights import WEIGHTS

    if name == "toy":
        return True
    if not Path(name).is_dir():
        return False
    base = Path(components.describe_source(name).base)
    return base.exists() and base.resolve().is_relative_to(WEIGHTS.resolve())


def for_training(cfg: Config, stage: int, subject: str) -> Measures | None:
    sec = cfg.stage1 if stage == 1 else cfg.stage2
    if not sec.validation.measures or sec.train.validation_images < 1:
        return None
    with_class = stage == 1 or sec.validation.chain  # stage II sees "a <class>" samples only when chained
    if _is_toy(getattr(cfg.models, f"stage{stage}")):
        from cascade.toy import live_measures

        return live_measures.measures(stage, with_class)
    from cascade.evaluation import live_measures

    return live_measures.build(subject, with_class=with_class)

"""Which live validation measures a training run gets (handed to the core in TrainRequest.measures):
the toy world's readers when the stage's model is the toy cascade (or an export of it), else DINO /
CLIP-I when those models are in the local cache, else none. The toy readers score the toy world's own
subject only: with other photos the run gets no measures (and best_checkpoint is refused: there is
nothing to select on)."""
from __future__ import annotations

import logging
from pathlib import Path

from cascade.config import Config, ConfigError
from cascade.validation import Measures
from stages import components

log = logging.getLogger(__name__)

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
        from cascade.toy import live_measures, measure, world

        if measure.is_world_subject(subject):
            return live_measures.measures(stage, with_class)
        why = (f"the toy readers score only the toy world's own subject ({world.SUBJECT_WORDS}), not the photos in "
               f"{subject}")
        if sec.validation.best_checkpoint and Path(subject).is_dir():  # a missing folder: train names it
            raise ConfigError(f"config 'stage{stage}.validation.best_checkpoint': {why}, so there is no fidelity to "
                              f"select on; set it to false (the last step is exported)")
        log.info("validation: no live measures: %s", why)
        return None
    from cascade.evaluation import live_measures

    return live_measures.build(subject, with_class=with_class)

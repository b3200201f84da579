"""torchrun helper: `cascade train stage1 ARGS` where only rank 1's loss turns NaN at its 2nd step
(so the test sees whether the other rank notices and stops with it instead of hanging)."""
import os
import sys

import torch

from cascade.cli.main import main
from stages import trainer

calls = {"n": 0}
real_loss = trainer.diffusion_loss


def poisoned(*args, **kwargs):
    out = real_loss(*args, **kwargs)
    calls["n"] += 1
    if os.environ.get("RANK") == "1" and calls["n"] == 2:
        out = out * torch.tensor(float("nan"))
    return out


trainer.diffusion_loss = poisoned
sys.exit(main(["train", "stage1", *sys.argv[1:]]))

"""torchrun helper: `cascade train stage1 ARGS` where only rank 1's loss turns NaN at its 2nd step
(so the test sees whether the other rank notices and stops with it instead of hanging).

Each rank copies its stderr to $DIVERGE_LOG.<rank> and, once done, waits for the other rank's copy
before exiting: torchrun terminates the remaining ranks as soon as one exits with an error, which
could otherwise cut off the other rank's error line under load."""
import os
import sys
import time
from pathlib import Path

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


class _Tee:
    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, "w", encoding="utf-8")

    def write(self, text):
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


trainer.diffusion_loss = poisoned
log, rank = os.environ["DIVERGE_LOG"], os.environ["RANK"]
sys.stderr = _Tee(sys.stderr, f"{log}.{rank}")
code = main(["train", "stage1", *sys.argv[1:]])
Path(f"{log}.{rank}.done").touch()
other = Path(f"{log}.{1 - int(rank)}.done")
for _ in range(600):  # up to 60 s: the other rank is still training or reporting
    if other.exists():
        break
    time.sleep(0.1)
sys.exit(code)

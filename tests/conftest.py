"""Shared fixtures: one tiny component build per test session, offline, deterministic."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"


def pytest_configure(config):
    """Under pytest-xdist (the README's `-n 2`), split the cores between the workers: two workers with
    a thread per core each would oversubscribe the CPU, which slows torch's CPU kernels severalfold."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to n inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one torch thread, far faster on an oversubscribed shared CPU."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A models.cache_dir holding the tiny components (built once per session)."""
    from cascade.offline.tiny import tiny_root

    cache = tmp_path_factory.mktemp("cascade-cache")
    tiny_root(str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny(cache_dir) -> Path:
    """The tiny component root: stage1/ (IFPipeline), stage2/ (IFSuperResolutionPipeline), stage3/."""
    return cache_dir / "tiny-v1"


@pytest.fixture
def make_cfg(cache_dir):
    """load_config("tiny") pointed at the session's tiny cache, plus dotted overrides."""
    from cascade.config import load_config

    def make(*overrides: str):
        return load_config("tiny", [f"models.cache_dir={cache_dir}", *overrides])
    return make


def _write_subject(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        # smooth coloured blobs: structured enough to learn, different per image
        c = rng.uniform(0, 1, (3, 2))
        img = np.stack([np.sin(6 * xx * c[k, 0] + 4 * yy * c[k, 1] + i) for k in range(3)], -1)
        Image.fromarray(((img + 1) * 127.5).astype("uint8")).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def subject_dir(tmp_path) -> Path:
    """The DreamBench dog when shared/ is beside the checkout, else 4 synthetic 320px images."""
    dog = SHARED_DATA / "dog"
    if dog.is_dir():
        return dog
    return _write_subject(tmp_path / "subject", 4, 320)


@pytest.fixture
def write_subject():
    return _write_subject


@pytest.fixture
def photos(write_subject, tmp_path):
    """Three synthetic 80 px subject photos."""
    return write_subject(tmp_path / "photos", 3, 80)


def sets(*items: str) -> list[str]:
    """`--set` flags for dotted config overrides."""
    return [x for item in items for x in ("--set", item)]


def hide_packages(monkeypatch, *packages: str):
    """importlib.util.find_spec finds none of `packages` (as on a machine without those extras)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.split(".")[0] in packages else real(n, *a))


def error_line(err: str) -> str:
    """A command's one error line (log lines may precede it): exactly one, and no traceback."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err and "Logging error" not in err, err
    return lines[0]


@pytest.fixture
def cli(cache_dir, capsys):
    """`cascade ARGV` in-process on the session's tiny cache -> (exit code, stderr). Adds
    `--set models.cache_dir=...` unless the arguments set it (`toy` has no settings); argparse's own exit
    for a bad flag counts as the exit code, as the console script has it."""
    from cascade.cli.main import main

    def go(*argv):
        argv = [str(a) for a in argv]
        if argv[0] != "toy" and not any(a.startswith("models.cache_dir=") for a in argv):
            argv += sets(f"models.cache_dir={cache_dir}")
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err
    return go


@pytest.fixture
def train_cli(cli):
    """`cascade train STAGE ARGV` at the fastest settings: 1 step, 2 class images, no validation."""
    def go(*argv, stage="stage1"):
        return cli("train", stage, *sets(f"{stage}.train.max_steps=1", f"{stage}.train.num_class_images=2",
                                         f"{stage}.train.validation_images=0", "stage1.sample.steps=1"), *argv)
    return go


def free_port() -> int:
    """A port no other process holds now: a fixed rendezvous port collides with another test launched
    beside it (pytest -n 2) or with an ephemeral port the system handed out, and torchrun then fails."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list, **extra_env) -> str:
    """Run `args` (a script and its arguments) in 2 CPU processes (gloo); its output; fails on an error."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra_env}
    proc = subprocess.run([str(exe), "--nproc_per_node", "2", "--master_port", str(free_port()), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=900)  # ~1 min idle
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    return text


def eval_loss(unet, x0, scheduler, seed: int) -> float:
    """The diffusion loss of `unet` on the images `x0` (x4) at fixed noise and timesteps 20..980: the same
    number before and after training means the training changed nothing."""
    import torch

    from stages.losses import DiffusionMath, diffusion_loss

    dm = DiffusionMath(scheduler.alphas_cumprod)
    g = torch.Generator().manual_seed(seed)
    x0 = x0.repeat(4, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(20, 980, x0.shape[0]).long()
    enc = torch.randn(1, 77, 32, generator=g).expand(x0.shape[0], -1, -1)
    with torch.no_grad():
        xt = dm.q_sample(x0, noise, t)
        return diffusion_loss(dm, unet(xt, t, encoder_hidden_states=enc).sample, x0, xt, noise, t).mean().item()

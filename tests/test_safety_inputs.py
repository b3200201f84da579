"""Nothing run, nothing read from outside (issue 17, items 6-8, 10, 12, 15): no load unpickles code,
caption files stay inside their folder and small, names are folder-safe, class folders are what
they claim, --resume knows when the photos changed, temporary files are never images."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from cascade.cli.main import main

REPO = Path(__file__).resolve().parents[1]


class Evil:
    """A pickle whose loading runs a function: it would create `flag`."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_no_load_in_the_repository_can_unpickle_code():
    """Item 6: every torch.load passes weights_only=True; no pickle/yaml.load/unsafe_load/np allow_pickle."""
    bad = []
    for f in list((REPO / "cascade").rglob("*.py")) + list((REPO / "stages").rglob("*.py")) + \
            list((REPO / "scripts").rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{f.relative_to(REPO)}: {m.group(0)}")
        for pattern in (r"\bpickle\.loads?\(", r"yaml\.load\(", r"unsafe_load", r"allow_pickle=True",
                        r"weights_only=False", r"\bdill\b", r"\bjoblib\b"):
            bad += [f"{f.relative_to(REPO)}: {pattern}" for _ in re.finditer(pattern, text)]
    assert bad == []


def test_toy_pretrain_resume_refuses_a_checkpoint_that_runs_code(tmp_path, capsys, one_thread):
    """Item 6: a crafted ckpt-stage1.pt (or embedding cache) is refused in one line; its code never runs."""
    out, flag = tmp_path / "pre", tmp_path / "pwned"
    small = ["--steps", "1", "--batch-size", "2", "--pool-size", "4", "--ckpt-every", "1", "--warmup-steps", "1"]
    assert main(["toy", "pretrain", "--output", str(out), *small]) == 0, capsys.readouterr().err
    capsys.readouterr()
    good = torch.load(out / "ckpt-stage1.pt", weights_only=True)
    torch.save({**good, "losses": Evil(flag)}, out / "ckpt-stage1.pt")
    code = main(["toy", "pretrain", "--output", str(out), "--resume", *small[:1], "2", *small[2:]])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "ckpt-stage1.pt" in line and "refused" in line and "it calls io.open" in line, line
    assert not flag.exists()
    embeds = torch.load(out / "embeds.pt", weights_only=True)
    torch.save({**embeds, "": Evil(flag)}, out / "embeds.pt")
    code = main(["toy", "pretrain", "--output", str(out), "--resume", *small])
    assert code == 2 and "embeds.pt" in error_line(capsys.readouterr().err) and not flag.exists()


def test_train_resume_refuses_a_checkpoint_that_runs_code(make_cfg, write_subject, tmp_path, capsys, one_thread):
    """Item 6: accelerate's checkpoint files (optimizer.bin ...) are read weights-only too."""
    cache, flag = make_cfg().models.cache_dir, tmp_path / "pwned"
    photos, out = write_subject(tmp_path / "photos", 3, 80), tmp_path / "run"
    argv = ["train", "stage1", "--subject", str(photos), "--class-noun", "dog", "--output", str(out),
            "--set", f"models.cache_dir={cache}", "--set", "stage1.train.prior_preservation=false",
            "--set", "stage1.train.validation_images=0", "--set", "stage1.train.checkpoint_every=1"]
    assert main([*argv, "--max-steps", "1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    ckpt = out / "checkpoints" / "checkpoint-000001"
    torch.save({"state": {}, "param_groups": Evil(flag)}, ckpt / "optimizer.bin")
    code = main([*argv, "--max-steps", "2", "--resume"])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "checkpoint-000001" in line and "refused" in line, line
    assert not flag.exists()

"""Resume runs nothing from a checkpoint and reports the EMA it restored (issue 27, items 1 and 11):
every file of every checkpoint a tiny EMA run writes, replaced by a crafted pickle, is refused in one
line and its code never runs; resuming a finished EMA run keeps `last_decay` in cascade.json."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from cascade.cli.main import main
from tests.conftest import error_line
from tests.test_safety_inputs import Evil


def _argv(cache: Path, photos: Path, out: Path) -> list[str]:
    return ["train", "stage1", "--subject", str(photos), "--class-noun", "dog", "--output", str(out),
            "--set", f"models.cache_dir={cache}", "--set", "stage1.train.prior_preservation=false",
            "--set", "stage1.train.validation_images=0", "--set", "stage1.train.checkpoint_every=1",
            "--set", "stage1.train.ema=true", "--set", "stage1.train.ema_decay=0.5", "--max-steps", "2"]


@pytest.fixture(scope="module")
def ema_run(cache_dir, tmp_path_factory):
    """A finished 2-step EMA run with a checkpoint at each step: (argv, run folder, its photos)."""
    from tests.conftest import _write_subject, torch_threads

    root = tmp_path_factory.mktemp("ema-run")
    photos, out = _write_subject(root / "photos", 3, 80), root / "run"
    with torch_threads(1):
        assert main(_argv(cache_dir, photos, out)) == 0
    return photos, out


def _crafted(path: Path, flag: Path, form: str):
    """Replace `path` by a pickle whose loading would create `flag` (torch.save's zip or a bare pickle)."""
    path.unlink()
    if form == "torch":
        torch.save({"state": {}, "x": Evil(flag)}, path)
    else:
        path.write_bytes(pickle.dumps(Evil(flag)))


def test_every_checkpoint_file_replaced_by_a_pickle_is_refused_and_never_runs(ema_run, cache_dir, tmp_path,
                                                                               capsys):
    photos, run = ema_run
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["checkpoint-000001", "checkpoint-000002"]
    names = sorted(f.name for f in ckpts[0].iterdir())
    capsys.readouterr()
    flag = tmp_path / "pwned"
    cases = 0
    for ckpt in ckpts:
        for name in sorted(f.name for f in ckpt.iterdir()):
            for form in ("torch", "bare"):
                copy = tmp_path / "copy"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(run, copy, symlinks=True)
                for other in ckpts:  # the checkpoint under test is the latest one
                    if other.name != ckpt.name:
                        shutil.rmtree(copy / "checkpoints" / other.name)
                _crafted(copy / "checkpoints" / ckpt.name / name, flag, form)
                code = main([*_argv(cache_dir, photos, copy), "--resume"])
                line = error_line(capsys.readouterr().err)
                assert code == 2 and ckpt.name in line and name in line and "refused" in line, (name, form, line)
                assert not flag.exists(), (name, form)
                cases += 1
    assert cases == 2 * 2 * len(names)
    assert {"ema.safetensors", "ema.json", "optimizer.bin", "model.safetensors"} <= set(names)
    assert not any(n.startswith("custom_checkpoint") for n in names)  # the EMA is not pickled


def test_resume_of_a_finished_or_killed_ema_run_keeps_last_decay(ema_run, cache_dir, tmp_path, capsys):
    photos, run = ema_run
    before = json.loads((run / "export" / "cascade.json").read_text())["ema"]
    assert before["last_decay"] is not None and before["optimization_steps"] == 2
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    with torch_one_thread():
        assert main([*_argv(cache_dir, photos, copy), "--resume"]) == 0, capsys.readouterr().err  # finished
        assert json.loads((copy / "export" / "cascade.json").read_text())["ema"] == before
        shutil.rmtree(copy / "export")  # killed between the last checkpoint and the export
        assert main([*_argv(cache_dir, photos, copy), "--resume"]) == 0, capsys.readouterr().err
    assert json.loads((copy / "export" / "cascade.json").read_text())["ema"] == before


def torch_one_thread():
    from tests.conftest import torch_threads

    return torch_threads(1)

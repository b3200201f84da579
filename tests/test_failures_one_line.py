"""Issue 17 items 16 and 17: failures that are not a wrong setting still end in one line with an exit
code (docs/errors.md): disk full and Ctrl-C say how to continue, undecodable text names the file,
values are checked as flags are parsed, a pickled weights file is refused."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from tests.conftest import error_line

NO_VALIDATION = ["--set", "stage1.train.prior_preservation=false", "--set", "stage1.train.validation_images=0"]


def train(photos, out, *more):
    return ["train", "stage1", "--subject", str(photos), "--class-noun", "dog", "--output", str(out),
            "--set", "stage1.train.max_steps=2", "--set", "stage1.train.checkpoint_every=1", *NO_VALIDATION, *more]


def _second_call_fails(real, exc):
    calls = []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*a, **k)
    return wrapped


@pytest.mark.parametrize("what", ["disk-full", "ctrl-c"])
def test_disk_full_or_ctrl_c_in_a_checkpoint_is_one_line_and_resumable(cli, photos, tmp_path, monkeypatch, one_thread,
                                                                       what):
    from stages import checkpoint

    exc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints" / "x")) \
        if what == "disk-full" else KeyboardInterrupt()
    monkeypatch.setattr(checkpoint, "save_checkpoint", _second_call_fails(checkpoint.save_checkpoint, exc))
    code, err = cli(*train(photos, tmp_path / "run"))
    line = error_line(err)
    assert code == (1 if what == "disk-full" else 130)
    assert ("disk full" in line and "free space" in line) if what == "disk-full" else "interrupted (Ctrl-C)" in line
    assert "the same command with --resume" in line
    monkeypatch.undo()
    code, err = cli(*train(photos, tmp_path / "run", "--resume"))  # and the hint is true
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "export" / "cascade.json").read_text())
    assert meta["subject"] == photos.name and len(meta["subject_files"]) == 16  # item 14 (issue 27: no path)


def test_disk_full_in_the_export_names_the_file(cli, photos, tmp_path, monkeypatch, one_thread):
    from stages import engines

    target = str(tmp_path / "run" / "export.tmp" / "unet" / "diffusion_pytorch_model.safetensors")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", target)
    monkeypatch.setattr(engines, "save_full_unet", full)
    code, err = cli(*train(photos, tmp_path / "run"))
    line = error_line(err)
    assert code == 1 and f"disk full (no space left on the device) writing {target}" in line and "--resume" in line


def test_ctrl_c_before_anything_was_saved_says_run_again(cli, photos, tmp_path, monkeypatch):
    from cascade import training

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(training.trainer, "train", interrupt)
    code, err = cli(*train(photos, tmp_path / "run"))
    assert code == 130 and "nothing was saved yet: run the same command again" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_text_files_that_are_not_utf8(cli, tmp_path):
    (tmp_path / "bad.yaml").write_bytes(b"name: caf\xe9\n")
    (tmp_path / "prompts.txt").write_bytes(b"a dog \xff\n")
    code, err = cli("sample", "--config", str(tmp_path / "bad.yaml"), "--prompt", "a dog", "--output", str(tmp_path / "o"))
    assert code == 2 and f"{tmp_path / 'bad.yaml'}: not UTF-8 text" in error_line(err)
    code, err = cli("sample", "--prompts-file", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "o"))
    assert code == 2 and "--prompts-file" in error_line(err) and "not UTF-8" in err
    assert not (tmp_path / "o").exists()


def test_empty_read_only_output_is_one_line(cli, tmp_path, monkeypatch):
    """A read-only mount (simulated: every write below it fails with EROFS, as on a real one)."""
    from cascade.runs import markers

    ro = tmp_path / "mnt"
    ro.mkdir()
    real_open, real_unlink = os.open, Path.unlink

    def ro_open(path, flags, *a):
        if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    def ro_unlink(self, missing_ok=False):
        if str(self).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_unlink(self, missing_ok)
    monkeypatch.setattr(markers.os, "open", ro_open)
    monkeypatch.setattr(Path, "unlink", ro_unlink)
    code, err = cli("sample", "--prompt", "a dog", "--stage2", "none", "--output", str(ro))
    assert code == 2 and f"cannot write to output folder {ro}: Read-only file system" in error_line(err)


def test_a_non_utf8_file_name_in_a_log_line(tmp_path, capsys):
    from cascade.runs import folders

    from _pytest.logging import LogCaptureHandler

    odd = os.fsdecode(b"caf\xe9.png")  # how Python names a Latin-1 file name on a UTF-8 system
    root = logging.getLogger()
    # pytest's own capture would carry the surrogate into the test report, which pytest-xdist cannot send
    captures = [h for h in root.handlers if isinstance(h, LogCaptureHandler)]
    folders.start_logging(tmp_path)
    for h in captures:
        root.removeHandler(h)
    try:
        logging.getLogger("cascade.test").warning("subject image %s skipped", odd)
    finally:
        for h in captures:
            root.addHandler(h)
        folders.stop_file_logging()
    assert "Logging error" not in capsys.readouterr().err
    assert "subject image caf\\udce9.png skipped" in (tmp_path / "log.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("argv, flag", [
    (["sample", "--prompt", "a dog", "--seed", str(2**64)], "--seed"),
    (["sample", "--prompt", "a dog", "--num-images", "0"], "--num-images"),
    (["sample", "--prompt", "a dog", "--num-images", "100000000"], "--num-images"),  # issue 27: allocator error at 62 s
    (["sample", "--prompt", "a", "--prompt", "b", "--num-images", "600"], "--num-images 600 x 2 prompts"),
    (["class-images", "--class-noun", "dog", "--num", "-3", "--output", "x"], "--num"),
    (["bench", "--resolution", "-64"], "--resolution"),
    (["bench", "--resolution", "0"], "--resolution"),
    (["bench", "--resolution", "7"], "--resolution 7"),
    (["toy", "check", "--guidance", "nan"], "--guidance"),
    (["toy", "check", "--guidance", "inf"], "--guidance"),
    (["toy", "check", "--guidance", "-1"], "--guidance"),
    (["toy", "check", "--num", "0"], "--num"),
    (["toy", "check", "--steps", "0"], "--steps"),
    (["toy", "check", "--noise-level", "-1"], "--noise-level"),
    (["toy", "check", "--threads", "0"], "--threads"),
    (["toy", "pretrain", "--output", "P", "--steps", "0"], "--steps"),
    (["toy", "pretrain", "--output", "P", "--batch-size", "0"], "--batch-size"),
    (["toy", "pretrain", "--output", "P", "--learning-rate", "0"], "--learning-rate"),
    (["toy", "pretrain", "--output", "P", "--ckpt-every", "0"], "--ckpt-every"),
    (["toy", "pretrain", "--output", "P", "--pool-size", "-1"], "--pool-size"),
    (["toy", "pretrain", "--output", "P", "--ema-decay", "1"], "--ema-decay"),
    (["toy", "pretrain", "--output", "P", "--crop", "7"], "--crop 7"),
    (["toy", "pretrain", "--output", "P", "--stage", "3"], "--stage"),
])
def test_values_refused_where_they_are_parsed(cli, tmp_path, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    code, err = cli(*argv)
    assert code == 2 and flag in error_line(err)
    assert not (tmp_path / "P").exists() and not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()


def test_a_nan_flag_is_named(cli):
    code, err = cli("toy", "check", "--guidance", "nan")
    assert code == 2 and "argument --guidance: must be a finite number, got 'nan'" in error_line(err)
    code, err = cli("sample", "--prompt", "x", "--seed", str(2**64))
    assert code == 2 and f"argument --seed: must be an integer in 0..{2**32 - 1}, got '{2**64}'" in error_line(err)


def test_study_sr_with_an_sr_export_of_another_cascade(cli, write_subject, tmp_path):
    from cascade.toy.weights import toy_root

    fake = tmp_path / "toy-sr-export"  # a 16 -> 64 export (the toy cascade) under the tiny 64 -> 256 one
    fake.mkdir()
    (fake / "cascade.json").write_text(json.dumps({"base": str(toy_root() / "stage2"), "kind": "lora", "stage": 2,
                                                   "lowres_size": 16, "identifier": "zq"}))
    code, err = cli("study-sr", "--subject", str(write_subject(tmp_path / "big", 3, 256)), "--class-noun", "dog",
                    "--sr", str(fake), "--dino", "none", "--stage1", "none", "--output", str(tmp_path / "o"))
    line = error_line(err)
    assert code == 2 and "trained to upsample 16px images" in line and "64px" in line
    assert not (tmp_path / "o").exists()


def test_a_pickled_unet_is_refused_in_one_line(cli, photos, tiny, tmp_path):
    import shutil

    import torch

    evil = tmp_path / "evil"
    shutil.copytree(tiny / "stage1", evil)
    for f in (evil / "unet").glob("*.safetensors"):
        f.unlink()
    proof = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {proof}",)
    torch.save({"w": Payload()}, evil / "unet" / "diffusion_pytorch_model.bin")
    code, err = cli(*train(photos, tmp_path / "o", "--model", str(evil)))
    line = error_line(err)
    assert code == 2 and "diffusion_pytorch_model.bin was refused" in line and "never unpickles code" in line
    assert not proof.exists() and not (tmp_path / "o").exists()


def test_a_pickled_checkpoint_is_refused_on_resume(cli, photos, tmp_path, one_thread):
    import torch

    run = tmp_path / "run"
    args = ["train", "stage1", "--subject", str(photos), "--class-noun", "dog", "--output", str(run),
            "--set", "stage1.train.checkpoint_every=1", *NO_VALIDATION]
    assert cli(*args, "--set", "stage1.train.max_steps=1")[0] == 0
    proof = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {proof}",)
    ckpt = next((run / "checkpoints").glob("checkpoint-*"))
    torch.save({"state": Payload()}, ckpt / "optimizer.bin")
    code, err = cli(*args, "--set", "stage1.train.max_steps=2", "--resume")
    line = error_line(err)
    assert code == 2 and f"checkpoint {ckpt} was refused" in line and "posix.system" in line and not proof.exists()


def test_another_os_error_is_one_line_exit_1(cli, tmp_path, monkeypatch):
    from cascade import runner

    def denied(output, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(output / "grid-stage1.png"))
    monkeypatch.setattr(runner, "_write_grids", denied)
    code, err = cli("sample", "--prompt", "a dog", "--stage2", "none", "--num-images", "1",
                    "--set", "stage1.sample.steps=1", "--output", str(tmp_path / "o"))
    assert code == 1 and f"Permission denied: '{tmp_path / 'o' / 'grid-stage1.png'}'" in error_line(err)


@pytest.mark.parametrize("size", ["abc", "0GB", "1.2.3GB"])
def test_a_bad_gpu_memory_is_refused_before_the_planner_runs(cli, monkeypatch, size):
    """Issue 27 item 16: `bench --estimate-memory --gpu-memory abc` traced for 126 s before refusing the size."""
    from cascade.perf import planner_report

    def planned(*a, **k):
        raise AssertionError("the planner ran before --gpu-memory was checked")

    monkeypatch.setattr(planner_report, "run", planned)
    code, err = cli("bench", "--estimate-memory", "--gpu-memory", size)
    assert code == 2 and f"--gpu-memory {size!r}: expected a size above 0" in error_line(err)


@pytest.mark.parametrize("where", ["checkpoint", "export", "sample"])
def test_disk_full_without_a_file_name_still_names_the_file(cli, photos, tmp_path, monkeypatch, one_thread, where):
    """Issue 27 item 17: a full disk reaches us from safetensors, torch or a plain write without a file
    name (errors.md promises "writing FILE"); the line names what was being written."""
    import accelerate
    from PIL import Image

    from stages import engines

    full = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                        'left on device" })')  # safetensors' words: no errno, no file name
    if where == "checkpoint":
        monkeypatch.setattr(accelerate.Accelerator, "save_state", _second_call_fails(accelerate.Accelerator.save_state, full))
        code, err = cli(*train(photos, tmp_path / "run"))
        named = str(tmp_path / "run" / "checkpoints" / "checkpoint-000002.tmp")
    elif where == "export":
        monkeypatch.setattr(engines, "save_full_unet", lambda *a, **k: (_ for _ in ()).throw(full))
        code, err = cli(*train(photos, tmp_path / "run"))
        named = str(tmp_path / "run" / "export.tmp")
    else:
        monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
        code, err = cli("sample", "--prompt", "a dog", "--num-images", "1", "--stage2", "none",
                        "--set", "stage1.sample.steps=1", "--output", tmp_path / "s")
        named = str(tmp_path / "s" / "stage1" / "00000.png")
    line = error_line(err)
    assert code == 1 and f"disk full (no space left on the device) writing {named}" in line, line


@pytest.mark.parametrize("text, where", [
    ("stage1:\n  train: {max_steps: 1\n password = hunter2\n", "at line 4, column 1 (expected ',' or '}', but got "),
    ("a: b: hunter2\n", "at line 1, column 5 (mapping values are not allowed here)"),
    ("x: *hunter2\n", "at line 1, column 4 (found undefined alias …)"),
    ("x:\n\t- hunter2\n", "at line 2, column 1 (found character … that cannot start any token)"),
])
def test_bad_yaml_is_one_line_with_file_line_and_column_and_no_content(cli, tmp_path, text, where):
    """Issue 27 item 17: a broken config file was 5 lines quoting it; now one line naming the file,
    line and column, quoting nothing of it (it may be any file the user can read)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code, err = cli("sample", "--config", bad, "--prompt", "x", "--output", tmp_path / "o")
    line = error_line(err)
    assert code == 2 and f"{bad}: not valid YAML {where}" in line and "hunter2" not in err, err
    assert len([x for x in err.splitlines() if x.strip() and not x.startswith("W")]) == 1


def test_a_folder_where_a_file_is_wanted_and_the_reverse(cli, tmp_path, capsys):
    """Issue 27 item 17: `build-tiny --output FILE` exited 1 with "[Errno 20] Not a directory" (bad
    input is 2); `sample --prompts-file DIR` said "not found"."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for output, says in ((afile, f"--output {afile}: it is a file, not a folder"),
                         (afile / "sub", f"--output {afile / 'sub'}: {afile} is a file, not a folder")):
        from cascade.cli.main import main

        code = main(["build-tiny", "--output", str(output)])  # no config: no --set
        assert code == 2 and says in error_line(capsys.readouterr().err)
    assert afile.read_text() == "mine"
    code, err = cli("sample", "--prompts-file", tmp_path, "--output", tmp_path / "o")
    assert code == 2 and f"--prompts-file {tmp_path} is a folder; give a text file" in error_line(err)

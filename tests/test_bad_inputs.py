"""Every bad input gets a one-line error (exit 2) naming the file or setting, before expensive work,
and nothing on disk is destroyed."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image



@pytest.fixture
def run(train_cli):
    return train_cli


def _img(path, size=(80, 80), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).convert(mode).save(path)
    return path


def test_subject_folder_errors(run, tmp_path):
    out = ["--class-noun", "dog", "--output", str(tmp_path / "o")]
    code, err = run("--subject", str(tmp_path / "missing"), *out)
    assert code == 2 and "subject folder not found" in err and "missing" in err
    (tmp_path / "empty").mkdir()
    code, err = run("--subject", str(tmp_path / "empty"), *out)
    assert code == 2 and "has 0 images" in err
    _img(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"not a jpeg at all")
    code, err = run("--subject", str(tmp_path / "bad"), *out)
    assert code == 2 and "b.jpg cannot be read" in err
    _img(tmp_path / "small" / "a.png", (40, 40))
    code, err = run("--subject", str(tmp_path / "small"), *out)
    assert code == 2 and "40x40" in err and "64px" in err
    assert not (tmp_path / "o").exists()  # nothing was started


def test_identifier_errors(run, subject_dir, tmp_path):
    for ident, msg in (("dog", "class noun"), ("photo", "common word")):
        code, err = run("--subject", str(subject_dir), "--class-noun", "dog", "--identifier", ident,
                        "--output", str(tmp_path / ident))
        assert code == 2 and msg in err and not (tmp_path / ident).exists()


def test_wrong_stage_model(run, subject_dir, tiny, tmp_path):
    code, err = run("--subject", str(subject_dir), "--class-noun", "dog", "--model", str(tiny / "stage2"),
                    "--output", str(tmp_path / "o"))
    assert code == 2 and "stage 2 UNet" in err and "stage 1 is expected" in err


def test_existing_output_is_never_overwritten_silently(run, subject_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run("--subject", str(subject_dir), "--class-noun", "dog", "--output", str(out))
    assert code == 2 and "exists" in err and "not a cascade run folder" in err
    assert (out / "precious.txt").read_text() == "keep me"
    # --overwrite replaces only cascade run folders (tests/test_run_folders.py)
    code, err = run("--subject", str(subject_dir), "--class-noun", "dog", "--output", str(out), "--overwrite")
    assert code == 2 and (out / "precious.txt").read_text() == "keep me"


def test_non_rgb_converted_and_class_folder_topped_up(run, tmp_path, caplog):
    subject = tmp_path / "subject"
    _img(subject / "a.png", (96, 96), "L")
    _img(subject / "b.png", (96, 96), "RGBA")
    classes = tmp_path / "classes"
    _img(classes / "mine.png", (64, 64))
    before = (classes / "mine.png").read_bytes()
    with caplog.at_level(logging.WARNING):
        code, err = run("--subject", str(subject), "--class-noun", "dog", "--class-dir", str(classes),
                        "--output", str(tmp_path / "o"), "--set", "stage1.train.num_class_images=3")
    assert code == 0, err
    assert any("is L, converted to RGB" in r.message for r in caplog.records)
    assert any("is RGBA, converted to RGB" in r.message for r in caplog.records)
    files = sorted(p.name for p in classes.glob("*.png"))
    assert files == ["class-000000.png", "class-000001.png", "mine.png"]  # two generated, the user's kept
    assert (classes / "mine.png").read_bytes() == before


def test_tracker_not_installed(run, subject_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    code, err = run("--subject", str(subject_dir), "--class-noun", "dog", "--report-to", "wandb",
                    "--output", str(tmp_path / "o"))
    assert code == 2 and "wandb" in err


def test_tensorboard_tracker_logs_losses(run, subject_dir, tmp_path):
    pytest.importorskip("tensorboardX", reason="the [dev] extra installs tensorboardX")
    out = tmp_path / "tb"
    code, err = run("--subject", str(subject_dir), "--class-noun", "dog", "--report-to", "tensorboard",
                    "--set", "stage1.train.max_steps=2", "--output", str(out))
    assert code == 0, err
    events = [p for p in out.rglob("events.out.tfevents*") if p.stat().st_size > 0]
    assert events and any(b"instance_loss" in p.read_bytes() and b"prior_loss" in p.read_bytes() for p in events)


# ---- issue 27: settings and lists refused whole, in one line naming them, before anything runs
@pytest.mark.parametrize("setting, says", [
    ("stage1.train.lora_type=dora", "lora_rank is 0 (a full fine-tune)"),  # item 9: ran a full fine-tune as "dora"
    ("stage1.train.seed=4294967296", "stage1.train.seed: must be an integer in 0..4294967295"),  # item 15
    ("identifier.seed=4294967296", "identifier.seed: must be an integer in 0..4294967295"),
    ("stage1.train.sample_every=0", "stage1.train.sample_every: must be >= 1"),  # item 17: blamed checkpoint_every
    ("study.seeds=4294967296", "study.seeds: expected integers in 0..4294967295"),
])
def test_settings_refused_in_one_line_naming_them(run, photos, tmp_path, setting, says):
    from tests.conftest import error_line

    code, err = run("--subject", str(photos), "--class-noun", "dog", "--output", str(tmp_path / "o"), "--set", setting)
    line = error_line(err)
    assert code == 2 and says in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, says", [
    ("--seeds", "4294967296", "0..4294967295"),  # item 15: a traceback
    ("--seeds", "0,0", "0 given twice"),  # item 17: failed after the whole first sweep
    ("--noise-levels", "0,,5", "no empty items"),  # item 17: read as 0,5
    ("--noise-levels", "0,5,", "no empty items"),
])
def test_study_sr_lists_refused_whole(cli, photos, tiny, tmp_path, flag, value, says):
    from tests.conftest import error_line

    code, err = cli("study-sr", "--subject", photos, "--class-noun", "dog", "--sr", tiny / "stage2",
                    "--output", tmp_path / "o", flag, value)
    line = error_line(err)
    assert code == 2 and flag in line and says in line, line
    assert not (tmp_path / "o").exists()

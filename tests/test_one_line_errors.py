"""Issue 9 items 5, 6, 11, 12: every failure is one line (exit 2) naming what is wrong, found before
any model loads and before any folder exists; a failed command leaves no folder behind (and never
removes one it did not create); models that cannot be loaded here are reported in one line."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import error_line


def train_args(subject, out, *more):
    return ["train", "stage1", "--subject", str(subject), "--class-noun", "dog", "--output", str(out),
            "--set", "stage1.train.max_steps=1", "--set", "stage1.train.prior_preservation=false",
            "--set", "stage1.train.validation_images=0", *more]


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder in which nothing can be created (a chmod'ed folder; as root, where chmod does not
    bind, a path under /sys)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    probe = Path("/sys") / f"cascade-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        yield Path("/sys")
        return
    probe.rmdir()
    pytest.skip("no unwritable folder on this machine")


# ---- item 5
def test_lora_export_as_model_is_refused(cli, photos, tiny, tmp_path):
    export = tmp_path / "lora-export"
    export.mkdir()
    (export / "cascade.json").write_text(json.dumps({"base": str(tiny / "stage1"), "kind": "lora", "stage": 1}))
    code, err = cli(*train_args(photos, tmp_path / "o", "--model", str(export)))
    assert code == 2 and "is a LoRA export" in error_line(err) and str(tiny / "stage1") in err
    assert not (tmp_path / "o").exists()


# ---- item 6
def test_failed_sample_and_class_images_leave_no_folder(cli, tiny, tmp_path):
    sample = ["sample", "--prompt", "a dog", "--set", "stage1.sample.steps=1", "--set", "stage2.sample.steps=1"]
    code, err = cli(*sample, "--stage1", str(tiny / "stage2"), "--output", str(tmp_path / "bs1"))
    assert code == 2 and "stage 2 UNet" in error_line(err) and "--resume" not in err
    code, err = cli("sample", "--prompt", "a [V] dog", "--output", str(tmp_path / "bs1"))
    assert code == 2 and "[V]" in error_line(err)
    code, err = cli("class-images", "--class-noun", "dog", "--num", "1", "--output", str(tmp_path / "cls"),
                    "--set", f"models.stage1={tiny / 'stage2'}")
    assert code == 2 and "stage 2 UNet" in error_line(err)
    assert not (tmp_path / "bs1").exists() and not (tmp_path / "cls").exists()


def test_a_crash_removes_only_the_folder_the_command_created(cli, photos, tmp_path, monkeypatch):
    from cascade import class_images, training

    def boom(*a, **k):
        raise RuntimeError("simulated crash before any result")

    monkeypatch.setattr(training.trainer, "train", boom)
    with pytest.raises(RuntimeError):
        cli(*train_args(photos, tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # created by the command: removed
    mine = tmp_path / "empty-but-mine"
    mine.mkdir()
    with pytest.raises(RuntimeError):
        cli(*train_args(photos, mine))
    assert mine.is_dir() and list(mine.iterdir()) == []  # not created by it: kept, only our files removed
    monkeypatch.setattr(class_images.data, "to_pil", boom)  # class-images fails while saving the first image
    with pytest.raises(RuntimeError):
        cli("class-images", "--class-noun", "dog", "--num", "1", "--output", str(tmp_path / "cls"),
            "--set", "stage1.sample.steps=1")
    assert not (tmp_path / "cls").exists()


def test_demo_checks_every_stage_input_before_any_folder(cli, write_subject, tmp_path):
    code, err = cli("demo", "--fast", "--subject", str(write_subject(tmp_path / "ok", 3, 300)),
                    "--output", str(tmp_path / "d1"))
    assert code == 2 and "--class-noun is required" in error_line(err)
    small = write_subject(tmp_path / "small", 3, 100)  # fine for stage I (64), too small for stage II (256)
    code, err = cli("demo", "--fast", "--config", "tiny", "--subject", str(small), "--class-noun", "dog",
                    "--output", str(tmp_path / "d2"))
    assert code == 2 and "100x100" in error_line(err) and "256px" in err
    assert "stage 1:" not in err  # refused before stage I trained
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


# ---- item 11
@pytest.mark.parametrize("setting", ["stage1.train.weight_decay=-1", "stage1.train.lr_warmup_steps=-5",
                                     "stage1.train.keep_checkpoints=-1", "stage1.train.learning_rate=.inf",
                                     "stage1.train.seed=-1", "stage2.sample.guidance_scale=-2"])
def test_bad_settings_refused_before_anything(cli, photos, tmp_path, setting):
    code, err = cli(*train_args(photos, tmp_path / "o", "--set", setting))
    assert code == 2 and setting.split("=")[0] in error_line(err)
    assert not (tmp_path / "o").exists()


def test_output_paths_that_cannot_be_written(cli, photos, tmp_path, unwritable):
    (tmp_path / "afile").write_text("x")
    code, err = cli(*train_args(photos, tmp_path / "afile", "--resume"))
    assert code == 2 and "is a file, not a folder" in error_line(err)
    assert (tmp_path / "afile").read_text() == "x"
    code, err = cli(*train_args(photos, unwritable / "run"))
    assert code == 2 and str(unwritable / "run") in error_line(err)
    code, err = cli(*train_args(photos, tmp_path / "o2", "--set", f"models.cache_dir={unwritable / 'cache'}"))
    assert code == 2 and "models.cache_dir" in error_line(err)
    assert not (tmp_path / "o2").exists()


def test_fp16_variant_missing_in_local_folder(cli, photos, tmp_path):
    code, err = cli(*train_args(photos, tmp_path / "o", "--set", "models.variant=fp16"))
    assert code == 2 and "models.variant=fp16" in error_line(err) and "no fp16 weight files" in err
    assert not (tmp_path / "o").exists()


# ---- item 12
@pytest.mark.parametrize("offline", [True, False])
def test_uncached_hub_model_without_network_is_one_fast_line(cli, photos, tmp_path, monkeypatch, offline):
    from huggingface_hub import constants

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # online mode, but the hub is unreachable (a closed local port answers at once)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    code, err = cli(*train_args(photos, tmp_path / "o", "--model", "nobody-here/IF-not-a-model"))
    seconds = time.monotonic() - start
    line = error_line(err)
    assert code == 2 and "nobody-here/IF-not-a-model" in line and "not in the local Hugging Face cache" in line
    assert ("HF_HUB_OFFLINE is set" in line) == offline and "models.stage1" in line
    assert seconds < 60  # no retry loop (a generous bound for a loaded machine; the check takes < 1 s)
    assert not (tmp_path / "o").exists()
    code, err = cli("sample", "--prompt", "a dog", "--stage2", "nobody-here/IF-II-nothing", "--output",
                    str(tmp_path / "s"))
    assert code == 2 and "nobody-here/IF-II-nothing" in error_line(err) and not (tmp_path / "s").exists()
    code, err = cli("identifier", "--set", "models.text_encoder=nobody-here/t5")
    assert code == 2 and "nobody-here/t5 (models.text_encoder)" in error_line(err)
    # issue 27 item 16: evaluate gave "cannot read a UNet config ... config.json" after 31.6 s of retries
    code, err = cli("evaluate", "--subject", photos, "--class-noun", "dog", "--identifier", "jaw",
                    "--stage1", "nobody-here/IF-I-nothing", "--output", tmp_path / "e")
    line = error_line(err)
    assert code == 2 and "nobody-here/IF-I-nothing (models.stage1) is not in the local Hugging Face cache" in line
    assert ("HF_HUB_OFFLINE is set" in line) == offline and not (tmp_path / "e").exists()


# ---- issue 27
FAST1, FAST2 = ([x for k in ("max_steps=1", "prior_preservation=false", "validation_images=1") for x in ("--set", f"stage{s}.train.{k}")]
                for s in (1, 2))

def test_toy_readers_score_only_the_toy_worlds_own_subject(cli, write_subject, tmp_path):
    """Item 7: with the user's photos on the toy preset, validation gets no toy-reader "fidelity" (it
    would score the toy world's subject), and best_checkpoint, which would select on it, is refused."""
    from cascade.cli import live_measures
    from cascade.config import load_config
    from cascade.toy import measure

    cfg = load_config("toy")
    mine = write_subject(tmp_path / "mine", 3, 64)
    assert live_measures.for_training(cfg, 1, str(mine)) is None
    assert live_measures.for_training(cfg, 2, str(mine)) is None
    toy = measure.write_subject(tmp_path / "toy")
    assert "fidelity" in live_measures.for_training(cfg, 1, str(toy)).names
    code, err = cli("train", "stage1", "--config", "toy", "--subject", mine, "--class-noun", "toy",
                    "--output", tmp_path / "o", "--set", "stage1.validation.best_checkpoint=true")
    line = error_line(err)
    assert code == 2 and "stage1.validation.best_checkpoint" in line and "toy world's own subject" in line
    assert str(mine) in line and not (tmp_path / "o").exists()


def test_a_cascade_that_does_not_chain_is_refused_as_sample_refuses_it(cli, photos, tiny, tmp_path):
    """Item 10: chained validation with a partner of other sizes (a 16 px stage I into a stage II export
    trained on 64 px inputs; a 16 px stage I partner of a 64 -> 256 stage II) and `toy premise --sr`
    with a stage II of another cascade are refused in one line, before any folder or model."""
    from cascade.toy import measure
    from cascade.toy.weights import toy_root

    sr64 = tmp_path / "sr-export-64"  # a stage II export of the tiny 64 -> 256 cascade
    sr64.mkdir()
    (sr64 / "cascade.json").write_text(json.dumps({"base": str(tiny / "stage2"), "kind": "lora", "stage": 2,
                                                   "lowres_size": 64, "identifier": "zq"}))
    code, err = cli("sample", "--stage1", toy_root() / "stage1", "--stage2", sr64, "--prompt", "a toy",
                    "--output", tmp_path / "s")
    assert code == 2 and "trained to upsample 64px images" in error_line(err)  # what sample says
    toy = measure.write_subject(tmp_path / "toy")
    code, err = cli("train", "stage1", "--config", "toy", "--subject", toy, "--class-noun", "toy",
                    "--output", tmp_path / "o1", "--set", "stage1.validation.chain=true", *FAST1,
                    "--set", f"stage1.validation.chain_model={sr64}")
    line = error_line(err)
    assert code == 2 and "stage1.validation.chain_model" in line and "trained to upsample 64px images" in line
    code, err = cli("train", "stage2", "--subject", photos, "--class-noun", "dog", "--output", tmp_path / "o2",
                    "--set", "stage2.validation.chain=true", *FAST2, "--set", f"stage2.validation.chain_model={toy_root() / 'stage1'}")
    line = error_line(err)
    assert code == 2 and "stage2.validation.chain_model" in line and "makes 16px images" in line and "64px" in line
    code, err = cli("toy", "premise", "--views", "1", "--seeds", "1", "--levels", "0", "--sr", tiny / "stage2")
    assert code == 2 and "--sr" in error_line(err) and "256px" in error_line(err)
    code, err = cli("toy", "premise", "--views", "1", "--seeds", "1", "--levels", "0", "--sr", tmp_path / "nowhere")
    assert code == 2 and "not a stage II pipeline folder" in error_line(err)  # item 15: was an AttributeError
    assert not any((tmp_path / o).exists() for o in ("s", "o1", "o2"))


def test_a_stage3_with_custom_code_is_refused_before_stages_1_and_2(cli, tiny, tmp_path):
    """Item 15: a custom module named in stage III's model_index.json was a 49-line traceback after
    stages I and II had run; now one line before any folder or model, and the module never runs."""
    import shutil

    s3 = tmp_path / "s3"
    shutil.copytree(tiny / "stage3", s3)
    index = json.loads((s3 / "model_index.json").read_text())
    (s3 / "model_index.json").write_text(json.dumps({**index, "unet": ["my_unet", "MyUNet"]}))
    for where in (s3, s3 / "unet"):
        (where / "my_unet.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n"
                                          "from diffusers import UNet2DConditionModel as MyUNet\n")
    code, err = cli("sample", "--prompt", "a dog", "--stage3", s3, "--output", tmp_path / "o",
                    "--set", "stage1.sample.steps=1", "--set", "stage2.sample.steps=1", "--set", "stage3.steps=1")
    line = error_line(err)
    assert code == 2 and "models.stage3" in line and "never runs code from a model folder" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "ran").exists()

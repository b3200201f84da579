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
from tests.conftest import error_line

REPO = Path(__file__).resolve().parents[1]


class Evil:
    """A pickle whose loading runs a function: it would create `flag`."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_no_load_in_the_repository_can_unpickle_code():
    """Item 6: every torch.load passes weights_only=True; no pickle/yaml.load/unsafe_load/np allow_pickle."""
    bad = []
    for f in [f for room in ("cascade", "stages", "scripts", "benchmarks") for f in (REPO / room).rglob("*.py")]:
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


def test_captions_stay_inside_the_folder_and_small(tmp_path, write_subject):
    """Item 7: a sidecar symlinked out of the folder is never read; an oversized caption is one line."""
    from cascade.captions import MAX_CAPTION_BYTES, CaptionError, read_captions

    subject = write_subject(tmp_path / "subject", 3, 80)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the secret")
    for i in range(3):
        (subject / f"{i:02d}.txt").write_text("a [V] dog")
    (subject / "02.txt").unlink()
    os.symlink(secret, subject / "02.txt")
    with pytest.raises(CaptionError, match="points outside the folder") as e:
        read_captions(subject, "sidecar", "jaw")
    assert "the secret" not in str(e.value) and "\n" not in str(e.value)
    (subject / "02.txt").unlink()
    (subject / "02.txt").write_text("a dog " * (MAX_CAPTION_BYTES // 6 + 10))
    with pytest.raises(CaptionError, match="larger than 4096 bytes"):
        read_captions(subject, "sidecar", "jaw")
    (subject / "inside.txt").write_text("a [V] dog in the park")
    (subject / "02.txt").unlink()
    os.symlink(subject / "inside.txt", subject / "02.txt")  # a link within the folder is fine
    assert read_captions(subject, "sidecar", "jaw")[2] == "a jaw dog in the park"
    os.symlink(secret, subject / "metadata.jsonl")
    with pytest.raises(CaptionError, match="points outside"):
        read_captions(subject, "metadata", "jaw")


@pytest.mark.parametrize("name", ["../../escape", "..", "a/b", "", ".hidden", "x\\y", "big" * 40])
def test_variant_names_are_safe_folder_names(name, tmp_path):
    """Item 8: study-sr --variant names become folders under --output: refused unless plain names."""
    from cascade.config import load_config
    from cascade.evaluation import sr_study
    from cascade.runs.folders import safe_name
    from stages.errors import InputError

    with pytest.raises(InputError, match="--variant"):
        safe_name(name, "--variant")
    req = sr_study.StudyRequest(load_config("tiny"), str(tmp_path / "nowhere"), "dog", variants=[(name, 0, 0)],
                                output=str(tmp_path / "out"))
    with pytest.raises(InputError, match="--variant"):
        sr_study.run_study(req)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()
    assert safe_name("low-aug_2.5", "--variant") == "low-aug_2.5"


def test_cli_refuses_an_escaping_variant(capsys):
    code = main(["study-sr", "--subject", "x", "--class-noun", "dog", "--train", "--variant", "../../escape=0:0"])
    assert code == 2 and "--variant '../../escape'" in error_line(capsys.readouterr().err)


def test_temporary_files_are_never_images_and_debris_is_cleaned(tmp_path):
    """Item 15: a killed run's class-000003.tmp.png is neither counted nor read; generate removes it."""
    import json

    from PIL import Image

    from cascade import class_images
    from stages import data

    folder = tmp_path / "cls"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(folder / f"class-{i:06d}.png")
    (folder / "class-000003.tmp.png").write_bytes(b"\x89PNG truncated")  # killed mid-write
    (folder / "cascade-class.json").write_text(json.dumps({"prompt": "a dog", "stage": 1}))
    assert [p.name for p in data.list_images(folder)] == [f"class-{i:06d}.png" for i in range(3)]
    assert len(data.load_folder(folder, 16, "class")) == 3  # was: "class-000003.tmp.png cannot be read"
    made = []

    def factory():
        return lambda seeds: made.extend(seeds) or torch.zeros(len(seeds), 3, 16, 16)

    files = class_images.generate(folder, 4, factory, 8, 0, "a dog")
    assert len(files) == 4 and made == [3] and not (folder / "class-000003.tmp.png").exists()


def test_class_folder_is_not_the_photos_and_not_another_models(make_cfg, write_subject, tmp_path, capsys):
    """Item 10: --class-dir = the subject folder and class-images --output <photos> are refused; a class
    folder made by another model or at another size is refused."""
    cache = make_cfg().models.cache_dir
    photos = write_subject(tmp_path / "photos", 3, 80)
    before = sorted(p.name for p in photos.iterdir())
    common = ["--set", f"models.cache_dir={cache}", "--set", "stage1.sample.steps=1"]
    code = main(["train", "stage1", "--subject", str(photos), "--class-noun", "dog", "--class-dir", str(photos),
                 "--output", str(tmp_path / "run"), *common])
    assert code == 2 and "is the subject folder" in error_line(capsys.readouterr().err)
    code = main(["class-images", "--class-noun", "dog", "--num", "4", "--output", str(photos), *common])
    assert code == 2 and "cascade did not make" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in photos.iterdir()) == before and not (tmp_path / "run").exists()
    cls = tmp_path / "cls"
    assert main(["class-images", "--class-noun", "dog", "--num", "1", "--output", str(cls), *common]) == 0
    rec = __import__("json").loads((cls / "cascade-class.json").read_text())
    assert rec["model"] == "tiny-v1/stage1" and rec["size"] == 64, rec
    capsys.readouterr()
    code = main(["class-images", "--class-noun", "dog", "--num", "2", "--output", str(cls), "--config", "toy",
                 *common])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "'tiny-v1/stage1' at 64 px" in line and "at 16 px" in line, line
    assert len(list(cls.glob("class-*.png"))) == 1


def test_resume_refuses_photos_replaced_at_the_same_path(make_cfg, write_subject, tmp_path, capsys, one_thread):
    """Item 12: the run identity holds the sha256 of the subject's files, not only their folder's path."""
    from cascade.runs import markers

    cache = make_cfg().models.cache_dir
    photos, out = write_subject(tmp_path / "photos", 3, 80, seed=1), tmp_path / "run"
    argv = ["train", "stage1", "--subject", str(photos), "--class-noun", "dog", "--output", str(out),
            "--set", f"models.cache_dir={cache}", "--set", "stage1.train.prior_preservation=false",
            "--set", "stage1.train.validation_images=0", "--set", "stage1.train.checkpoint_every=1"]
    assert main([*argv, "--max-steps", "1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    first = markers.read_marker(out)["run"]["subject_sha256"]
    write_subject(photos, 3, 80, seed=2)  # other photos, same names, same folder
    code = main([*argv, "--max-steps", "2", "--resume"])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "subject photos (content) changed" in line and first[:12] in line, line
    write_subject(photos, 3, 80, seed=1)  # the original photos back: the same run, resumed
    assert main([*argv, "--max-steps", "2", "--resume"]) == 0, capsys.readouterr().err


def test_below_bars_names_each_measure_under_its_bar():
    from cascade.toy import check

    assert check.below_bars({"colour_acc": 1.0, "shape_acc": 0.875}, {"pattern_acc": 0.8, "consistency_psnr": 29.0}) \
        == ["shape_acc 0.875 < 0.9", "consistency_psnr 29 < 30"]
    assert check.below_bars({"colour_acc": float("nan"), "shape_acc": 1.0}, None) == ["colour_acc nan < 0.95"]
    assert check.below_bars({"colour_acc": 0.95, "shape_acc": 0.9}, {"pattern_acc": 1.0, "consistency_psnr": 31}) == []

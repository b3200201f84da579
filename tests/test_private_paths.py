"""An export carries no local path (issue 27, item 5): cascade.json, the model card and the configs
that `cascade push` uploads name the base model by hub id or by a path relative to the export (or to
`~`), and the subject by its folder name; the export still loads from where it is."""
from __future__ import annotations

from pathlib import Path

import pytest

from cascade.cli.main import main
from stages import components


@pytest.mark.parametrize("lora", [False, True])
def test_no_exported_file_holds_a_local_path(cache_dir, tiny, tmp_path, write_subject, capsys, one_thread, lora):
    photos, out = write_subject(tmp_path / "my-dog-photos", 3, 80), tmp_path / "run"
    argv = ["train", "stage1", "--subject", str(photos), "--class-noun", "dog", "--output", str(out),
            "--set", f"models.cache_dir={cache_dir}", "--set", "stage1.train.prior_preservation=false",
            "--set", "stage1.train.validation_images=1", "--set", "stage1.train.validation_steps=1",
            "--set", "stage1.sample.steps=1", "--max-steps", "1"] + (["--set", "stage1.train.lora_rank=2"] if lora else [])
    assert main(argv) == 0, capsys.readouterr().err
    export = out / "export"
    files = [f for f in export.rglob("*") if f.is_file()]
    assert {"cascade.json", "README.md"} <= {f.name for f in files}
    private = [str(tmp_path), str(cache_dir), str(Path.home()), str(tmp_path.resolve()), str(cache_dir.resolve())]
    for f in files:
        data = f.read_bytes()
        leaks = [p for p in private if p.encode() in data]
        assert not leaks, (f.relative_to(export), leaks)
    source = components.describe_source(str(export))
    assert Path(source.base) == (tiny / "stage1").resolve()  # the export still finds its base
    assert source.meta["subject"] == "my-dog-photos"
    if not lora:
        from diffusers import UNet2DConditionModel

        assert UNet2DConditionModel.from_pretrained(export, subfolder="unet").config.in_channels == 3


def test_a_base_under_home_is_recorded_from_home(tmp_path, monkeypatch):
    """A base in the home cache and a run elsewhere: `~/...`, never the home directory's own path."""
    home, runs = tmp_path / "home" / "alice", tmp_path / "data" / "runs"
    base = home / ".cache" / "cascade" / "tiny-v1" / "stage1"
    base.mkdir(parents=True)
    (runs / "export").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    recorded = components.portable_base(str(base), runs / "export")
    assert recorded == "~/.cache/cascade/tiny-v1/stage1" and "alice" not in recorded
    (runs / "export" / "cascade.json").write_text(f'{{"base": "{recorded}", "kind": "full"}}')
    assert components.describe_source(str(runs / "export")).base == str(base.resolve())
    assert components.portable_base("DeepFloyd/IF-I-XL-v1.0", runs / "export") == "DeepFloyd/IF-I-XL-v1.0"

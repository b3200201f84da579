"""`cascade demo --fast`: the whole mission end to end; the report links only files that exist."""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from cascade.cli.main import main


def test_demo_fast_report(make_cfg, tmp_path, write_subject, capsys):
    cache = make_cfg().models.cache_dir
    subject = write_subject(tmp_path / "subject", 3, 256)
    out = tmp_path / "demo"
    assert main(["demo", "--config", "tiny", "--fast", "--stage3", "--output", str(out), "--subject", str(subject),
                 "--class-noun", "toy", "--set", f"models.cache_dir={cache}"]) == 0
    printed = capsys.readouterr().out
    assert "noise" in printed  # the demo says plainly that tiny random weights make noise
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_weights"] is True and "noise" in summary["weights"]
    assert summary["stage2"]["sample_noise_level"] == 0  # trained at 0..0 (the paper) -> sampled at 0
    page = (out / "report.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(links) > 10
    for link in links:
        assert (out / link).is_file(), f"report.html links a missing file: {link}"
    for must in ("stage1/loss.png", "stage2/loss.png", "samples-before/grid-stage2.png",
                 "samples-after/grid-stage2.png", "samples-after/grid-stage3.png", "subject.png"):
        assert must in links
    assert "noise by construction" in page
    # fine-tuning changed the cascade's output for the same prompts and seeds
    before = (out / "samples-before" / "stage1" / "00000.png").read_bytes()
    assert before != (out / "samples-after" / "stage1" / "00000.png").read_bytes()
    after = json.loads((out / "samples-after" / "samples.json").read_text())
    assert after["stage1"]["kind"] == "full" and after["stage2"]["noise_level"] == 0
    assert Path(after["stage1"]["path"]).name == "export"


def test_demo_default_is_the_toy_world(tmp_path, capsys):
    """Without --config the demo runs the toy world: its subject written into the run folder, the
    readers' numbers in summary.json and report.html (values from --fast's few steps are not claims)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "demo"
        assert main(["demo", "--fast", "--output", str(out), "--set", f"models.cache_dir={tmp_path / 'cache'}"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "toy world" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"] == "toy" and summary["random_weights"] is False
    assert Path(summary["subject"]) == out / "subject" and len(list((out / "subject").glob("*.png"))) == 5
    assert summary["prompts"] == [f"a {summary['identifier']} toy", "a toy"]
    toy = summary["toy"]
    for name in ("before", "after"):
        assert 0 <= toy[name]["subject_fidelity"] <= 1 and 0 <= toy[name]["class_entropy_bits"] <= 4.6
    assert set(toy["sr_heldout_views"]) == {"base", "fine-tuned low", "fine-tuned high"}
    assert toy["sr_heldout_views"]["fine-tuned high"]["noise_aug"] == [500, 500]  # the glyph oracle's floor
    assert all(0 <= v["glyph_hit"] <= 1 and v["glyph_drawn"] <= 1.5 for v in toy["sr_heldout_views"].values())
    # the subject's photos carry its glyph, placed anew in each (issue 28)
    from cascade.toy import glyph, world

    photos = world.to_tensor([Image.open(p).convert("RGB") for p in sorted((out / "subject").glob("*.png"))])
    assert torch.equal(photos, world.to_tensor(glyph.photos()))
    assert (out / "stage2-high").is_dir()
    page = (out / "report.html").read_text()
    for link in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert (out / link).is_file(), f"report.html links a missing file: {link}"
    assert "toy world" in page and "--config if-xl" in page and "sr-subject.png" in page


def test_toy_demo_with_user_photos_shows_no_reader_numbers(tmp_path, write_subject, capsys, one_thread):
    """Issue 17 item 11: the toy readers measure the toy world's own subject; with the user's photos
    the demo says they do not apply instead of reporting "fidelity 0% -> 100%" for another subject."""
    photos = write_subject(tmp_path / "mine", 3, 64)
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--subject", str(photos), "--class-noun", "toy", "--output", str(out),
                 "--set", f"models.cache_dir={tmp_path / 'cache'}"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["toy"] is None and "do not apply" in summary["readers_note"] and "do not apply" in printed
    page = (out / "report.html").read_text()
    assert "do not apply" in page and "subject fidelity" not in page and "What the readers measure" not in page
    assert not (out / "sr-subject.png").exists()
    jobs = [k for k in summary["timings_seconds"] if "trainings" in k]  # issue 27 item 18: one thread: in turn
    assert jobs and all(k.endswith("(before the trainings, in turn: one core)") for k in jobs), jobs
    for stage in ("stage1", "stage2"):  # issue 27 item 7: nor a "fidelity" of the toy subject per validation
        csv = out / stage / "validation.csv"
        assert not csv.exists() or "fidelity" not in csv.read_text()

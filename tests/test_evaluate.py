"""`cascade evaluate`: DreamBench prompt parsing, the metric definitions on inputs where the answer is
known by construction, and the command end to end on tiny components (generation, resume, --images)."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from cascade.evaluation import metrics
from cascade.cli.main import main
from tests.conftest import SHARED_DATA

FAST = ["--set", "stage1.sample.steps=1", "--set", "stage2.sample.steps=1"]


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    from cascade.offline.tiny_metrics import tiny_metric_model

    cache = str(tmp_path_factory.mktemp("metric-models"))
    return tiny_metric_model(cache, "dino"), tiny_metric_model(cache, "clip")


def test_prompt_parsing_packaged_and_dataset():
    bench = metrics.load_dreambench()
    assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25 and len(bench.classes) == 30
    assert sum(c in metrics.LIVE_CLASSES for c in bench.classes.values()) == 9  # the paper's 9 live subjects
    assert bench.templates("dog") is bench.live_prompts and bench.templates("teapot") is bench.object_prompts
    for t in bench.object_prompts + bench.live_prompts:
        filled = metrics.fill(t, "jaw", "dog")
        assert " jaw dog" in filled and "{" not in filled
        assert "jaw" not in metrics.clip_t_prompt(t, "dog") and "dog" in metrics.clip_t_prompt(t, "dog")
    assert metrics.clip_t_prompt("a {0} {1} in the jungle", "dog") == "a dog in the jungle"
    if SHARED_DATA.is_dir():  # the packaged copy holds exactly the dataset's lists
        ds = metrics.load_dreambench(str(SHARED_DATA))
        assert (ds.object_prompts, ds.live_prompts, ds.classes) == (bench.object_prompts, bench.live_prompts,
                                                                    bench.classes)


def _images(colors, size=48):
    out = []
    for i, c in enumerate(colors):
        im = Image.new("RGB", (size, size), c)
        im.paste(Image.new("RGB", (size // 3, size // 3), (255 - c[0], 40 * i % 255, 90)), (5 * i, 7))
        out.append(im)
    return out


def test_real_vs_themselves_max_and_shuffled_subjects_lower(metric_models, tmp_path):
    dino = metrics.DinoScorer(metric_models[0])
    clip = metrics.ClipScorer(metric_models[1])
    photos = _images([(200, 30, 30), (30, 200, 30), (30, 30, 200)])
    for scorer in (dino, clip):
        sim = scorer.embed(photos) @ scorer.embed(photos).T
        assert torch.allclose(sim.diagonal(), torch.ones(3), atol=1e-5)
        assert (sim.max(1).values <= sim.diagonal() + 1e-6).all()  # each image is most similar to itself
    # generated images identical to subject A's photo score DINO 1 against A; assigned to subject B they score less
    from cascade.evaluation.dreambench import score_folder
    from cascade.evaluation.image_metrics import Lpips

    folder = tmp_path / "gen"
    folder.mkdir()
    for k in range(2):
        photos[0].save(folder / f"p00-k{k}.png")
    scorers = (dino, clip, Lpips())
    own = {"dino": dino.embed(photos[:1]), "clip": clip.embed(photos[:1])}
    other = {"dino": dino.embed(photos[1:2]), "clip": clip.embed(photos[1:2])}
    tmpl = ["a {0} {1} in the jungle"]
    a = score_folder(folder, "x", tmpl, "toy", "jaw", own, scorers)["summary"]
    b = score_folder(folder, "x", tmpl, "toy", "jaw", other, scorers)["summary"]
    assert a["dino"] == pytest.approx(1.0, abs=1e-5) and a["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert b["dino"] < a["dino"] and b["clip_i"] < a["clip_i"]


def test_clip_t_prefers_the_own_prompt_of_a_trained_clip(metric_models, tmp_path):
    """Train the tiny CLIP contrastively on two (image, prompt) pairs: by construction each image then
    matches its own prompt; CLIP-T as the evaluation computes it must say so."""
    from transformers import AutoProcessor, CLIPModel

    model, proc = CLIPModel.from_pretrained(metric_models[1]), AutoProcessor.from_pretrained(metric_models[1])
    photos = _images([(220, 20, 20), (20, 20, 220)])
    prompts = ["a dog in the snow", "a teapot on the beach"]
    batch = proc(text=prompts, images=photos, return_tensors="pt", padding=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        loss = model(**batch, return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = tmp_path / "clip"
    model.save_pretrained(trained)
    proc.save_pretrained(trained)
    clip = metrics.ClipScorer(str(trained))
    sim = clip.embed(photos) @ clip.embed_text(prompts).T
    assert sim[0, 0] > sim[0, 1] and sim[1, 1] > sim[1, 0]


def test_missing_metric_model_one_line_no_folder(tmp_path, make_cfg, capsys, subject_dir):
    out = tmp_path / "eval"
    code = main(["evaluate", "--subject", str(subject_dir), "--class-noun", "dog", "--identifier", "jaw",
                 "--dino", str(tmp_path / "no-such-dino"), "--output", str(out),
                 "--set", f"models.cache_dir={make_cfg().models.cache_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no-such-dino" in err[0] and "DINO" in err[0]
    assert not out.exists()


def test_evaluate_end_to_end_resume_and_images(tmp_path, make_cfg, metric_models, write_subject, capsys):
    subject = write_subject(tmp_path / "dog", 3, 64)
    out = tmp_path / "eval"
    args = ["evaluate", "--subject", str(subject), "--identifier", "jaw", "--max-prompts", "2", "--num-images", "2",
            "--num-class-images", "2", "--chunk", "1", "--dino", metric_models[0], "--clip", metric_models[1],
            "--output", str(out), "--set", f"models.cache_dir={make_cfg().models.cache_dir}", *FAST]
    assert main(args + ["--stage2", "none"]) == 0  # class "dog" from the folder name (live prompts)
    first = capsys.readouterr().out
    assert "quoted from the paper" in first and "mean nothing" in first and "noise" in first
    folder = out / "dog" / "fine-tuned"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert (folder / "cascade-images.json").is_file()  # what made the images (reused only for the same)
    assert names == ["class-k0.png", "class-k1.png", "p00-k0.png", "p00-k1.png", "p01-k0.png", "p01-k1.png"]
    assert Image.open(folder / "p00-k0.png").size == (64, 64)  # --stage2 none: stage I images
    stamp = {n: (folder / n).stat().st_mtime_ns for n in names}
    (folder / "p01-k1.png").unlink()  # an interrupted run: one image missing
    assert main(args + ["--stage2", "none", "--baseline"]) == 0
    assert {n: (folder / n).stat().st_mtime_ns for n in names if n != "p01-k1.png"} == \
        {n: t for n, t in stamp.items() if n != "p01-k1.png"}  # kept, not regenerated
    assert (folder / "p01-k1.png").is_file() and len(list((out / "dog" / "base").glob("p*-k*.png"))) == 4
    for f in ("per_image.csv", "per_prompt.csv", "summary.csv", "results.json", "table.md", "plot.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    overall = {r["model"]: r for r in res["overall"]}
    assert set(overall) == {"real images", "fine-tuned", "base"}
    assert res["div_unavailable"] or overall["fine-tuned"]["div"] is not None  # DIV: a number or the reason
    table = (out / "table.md").read_text()
    assert "0.696" in table and "0.493" in table and "DIV" in table
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 8 and {r["clip_t_prompt"] for r in rows} == {"a dog in the jungle", "a dog in the snow"}
    # fine-tuned (= the tiny base here) and base give identical images for the same seeds, so equal scores
    assert overall["fine-tuned"]["dino"] == pytest.approx(overall["base"]["dino"], abs=1e-6)
    # --images scores a folder as it is, with the same numbers
    out2 = tmp_path / "eval2"
    assert main(["evaluate", "--subject", str(subject), "--images", str(folder), "--dino", metric_models[0],
                 "--clip", metric_models[1], "--output", str(out2), "--max-prompts", "2"]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    ft2 = {r["model"]: r for r in res2["overall"]}["fine-tuned"]
    assert ft2["dino"] == pytest.approx(overall["fine-tuned"]["dino"], abs=1e-6)
    assert ft2["pres"] == pytest.approx(overall["fine-tuned"]["pres"], abs=1e-6)


def test_two_process_evaluate_matches_one(tmp_path, make_cfg, metric_models, write_subject, one_thread):
    """`accelerate launch`/torchrun spreads evaluate's generation over ranks through the runner; the images
    and the scores equal a single-process run's, and only rank 0 scores and writes the tables."""
    import numpy as np

    from tests.conftest import torchrun

    subject = write_subject(tmp_path / "dog", 2, 64)
    common = ["evaluate", "--subject", str(subject), "--identifier", "jaw", "--max-prompts", "2", "--num-images",
              "2", "--num-class-images", "2", "--chunk", "2", "--stage2", "none", "--dino", metric_models[0],
              "--clip", metric_models[1], "--set", f"models.cache_dir={make_cfg().models.cache_dir}", *FAST,
              "--set", "stage1.sample.batch_size=1"]
    assert main(common + ["--output", str(tmp_path / "one")]) == 0
    helper = __import__("pathlib").Path(__file__).parent / "helpers" / "cli_main.py"
    text = torchrun([helper], CASCADE_ARGV=json.dumps(common + ["--output", str(tmp_path / "two")]))
    assert "process 0/2" in text and "process 1/2" in text, text[-2000:]
    one = sorted((tmp_path / "one" / "dog" / "fine-tuned").glob("*.png"))
    two = sorted((tmp_path / "two" / "dog" / "fine-tuned").glob("*.png"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 6
    for a, b in zip(one, two):
        diff = np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)
        assert np.abs(diff).max() <= 1, a.name
    scores = [{r["model"]: r for r in json.loads((tmp_path / d / "results.json").read_text())["overall"]}
              for d in ("one", "two")]
    for key in ("dino", "clip_i", "clip_t", "pres"):
        assert scores[1]["fine-tuned"][key] == pytest.approx(scores[0]["fine-tuned"][key], abs=2e-3), key


def test_div_is_the_mean_pairwise_distance_within_each_prompt(metric_models, tmp_path, monkeypatch):
    """The DIV path with a working `lpips` (which needs torchvision, absent here), run through a stand-in
    module whose distance is the mean absolute pixel difference, so the expected DIV is known exactly:
    per prompt the mean over unordered pairs, then the mean over prompts."""
    import sys
    import types

    from cascade.evaluation.dreambench import score_folder
    from cascade.evaluation.image_metrics import Lpips

    class MeanAbs(torch.nn.Module):
        def __init__(self, net="alex", verbose=True):
            super().__init__()

        def forward(self, a, b):
            assert a.min() >= -1 and a.max() <= 1  # LPIPS takes [-1, 1] images
            return (a - b).abs().mean().reshape(1, 1, 1, 1)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=MeanAbs))
    lp = Lpips()
    assert lp.available and lp.reason == ""
    folder = tmp_path / "gen"
    folder.mkdir()
    colours = {"p00-k0": 0, "p00-k1": 255, "p00-k2": 0, "p01-k0": 128, "p01-k1": 128}
    for name, v in colours.items():
        Image.new("RGB", (32, 32), (v, v, v)).save(folder / f"{name}.png")
    dino, clip = metrics.DinoScorer(metric_models[0]), metrics.ClipScorer(metric_models[1])
    real = {"dino": dino.embed([Image.new("RGB", (32, 32))]), "clip": clip.embed([Image.new("RGB", (32, 32))])}
    out = score_folder(folder, "x", ["a {0} {1}", "a {0} {1} on a rug"], "toy", "jaw", real, (dino, clip, lp))
    per_prompt = [p["div"] for p in out["prompts"]]
    assert per_prompt == pytest.approx([(2 + 0 + 2) / 3, 0.0], abs=1e-6)  # black/white pairs differ by 2
    assert out["summary"]["div"] == pytest.approx(2 / 3, abs=1e-6)


def test_an_evaluation_folder_reuses_images_only_of_the_same_setup(tmp_path, make_cfg, metric_models, write_subject,
                                                                  tiny, capsys, one_thread):
    """Issue 17 item 9: another model (path or content), sampling setting, seed or --num-images into the
    same --output is refused (the old images would be scored as the new model's); a second subject is
    added to the same folder (the README's "once per subject with the same --output")."""
    import shutil

    dog, cat = write_subject(tmp_path / "dog", 3, 64), write_subject(tmp_path / "cat", 3, 64, seed=1)
    out = tmp_path / "eval"
    model = tmp_path / "model-stage1"
    shutil.copytree(tiny / "stage1", model)
    base = ["evaluate", "--identifier", "jaw", "--max-prompts", "1", "--num-images", "1", "--num-class-images", "1",
            "--stage2", "none", "--dino", metric_models[0], "--clip", metric_models[1], "--output", str(out),
            "--set", f"models.cache_dir={make_cfg().models.cache_dir}", *FAST]
    assert main(base + ["--subject", str(dog), "--stage1", str(model)]) == 0
    capsys.readouterr()
    images = out / "dog" / "fine-tuned"
    before = {p.name: p.read_bytes() for p in images.glob("*.png")}

    def refused(extra, changed):
        assert main(base + ["--subject", str(dog)] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds images made by another setup" in err[0] and changed in err[0], err
        assert "--resume" not in err[0]

    refused(["--stage1", str(tiny / "stage1")], "stage1.path")
    refused(["--stage1", str(model), "--set", "stage1.sample.guidance_scale=2.5"],
            "sampling.stage1.guidance_scale 7.0 -> 2.5")
    refused(["--stage1", str(model), "--num-images", "2"], "num_images 1 -> 2")
    refused(["--stage1", str(model), "--seed", "5"], "seed 0 -> 5")
    time.sleep(0.01)
    (model / "unet" / "config.json").write_text((model / "unet" / "config.json").read_text() + " ")
    refused(["--stage1", str(model)], "stage1.content")  # a model rewritten in place
    assert {p.name: p.read_bytes() for p in images.glob("*.png")} == before
    shutil.rmtree(model)
    shutil.copytree(tiny / "stage1", model)
    assert main(base + ["--subject", str(cat), "--class-noun", "cat", "--stage1", str(model)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {r["subject"] for r in res["per_subject"]} == {"dog", "cat"}  # one folder, two subjects


def test_evaluate_refuses_a_folder_it_did_not_make(tmp_path, make_cfg, metric_models, write_subject, capsys):
    dog = write_subject(tmp_path / "dog", 3, 64)
    run = tmp_path / "train-run"
    run.mkdir()
    (run / ".cascade-run").write_text(json.dumps({"command": "train stage1"}))
    (run / "notes.txt").write_text("mine")
    code = main(["evaluate", "--subject", str(dog), "--identifier", "jaw", "--output", str(run), "--dino",
                 metric_models[0], "--clip", metric_models[1], "--set", f"models.cache_dir={make_cfg().models.cache_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a cascade train stage1 folder, not an evaluation folder" in err[0]
    assert "--resume" not in err[0] and sorted(p.name for p in run.iterdir()) == [".cascade-run", "notes.txt"]


@pytest.mark.parametrize("command", ["evaluate", "study-sr"])
def test_default_metric_models_without_network_fail_in_one_fast_line(tmp_path, make_cfg, write_subject, capsys,
                                                                     monkeypatch, command):
    """Issue 17 item 18: HF_HUB_OFFLINE unset, the hub unreachable (a closed local port), the default
    DINO id not cached: one probe and one line, not minutes of hub retries."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    dog = write_subject(tmp_path / "dog", 3, 256)
    argv = ["evaluate", "--identifier", "jaw"] if command == "evaluate" else \
        ["study-sr", "--class-noun", "dog", "--sr", str(Path(make_cfg().models.cache_dir) / "tiny-v1" / "stage2"),
         "--stage1", "none", "--noise-levels", "0", "--seeds", "0",
         "--max-images", "1", "--class-images", "0", "--set", "stage2.sample.steps=1"]
    start = time.monotonic()
    code = main(argv + ["--subject", str(dog), "--output", str(tmp_path / "o"),
                        "--set", f"models.cache_dir={make_cfg().models.cache_dir}"])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    if command == "study-sr":  # issue 18: a DINO that cannot be had is an unavailable column, not an error
        assert code == 0, err[-2000:]
        info = json.loads((tmp_path / "o" / "results.json").read_text())
        assert code == 0 and info["dino"].startswith("DINO: unavailable") and metrics.DEFAULT_DINO in info["dino"]
        assert "Traceback" not in err and seconds < 60, seconds
        return
    err = [line for line in err.strip().splitlines() if ": error: " in line]
    assert code == 2 and len(err) == 1 and metrics.DEFAULT_DINO in err[0] and "(--dino)" in err[0], err
    assert "cannot be reached" in err[0] and seconds < 30 and not (tmp_path / "o").exists()


def test_two_subject_folders_of_one_name_do_not_replace_each_other(tmp_path, metric_models, write_subject, capsys):
    """Issue 27 item 8: subjects are keyed by their folder's name; a second folder named `dog` into the
    same evaluation folder would replace the first dog's rows: refused in one line, the first kept."""
    first, second = write_subject(tmp_path / "a" / "dog", 3, 64), write_subject(tmp_path / "b" / "dog", 3, 64, seed=1)
    images = write_subject(tmp_path / "images", 1, 64)
    (images / "00.png").rename(images / "p00-k0.png")
    out = tmp_path / "eval"
    args = ["evaluate", "--images", str(images), "--max-prompts", "1", "--identifier", "jaw",
            "--dino", metric_models[0], "--clip", metric_models[1], "--output", str(out)]
    assert main(args + ["--subject", str(first)]) == 0
    scores = (out / "dog" / "scores.json").read_text()
    capsys.readouterr()
    assert main(args + ["--subject", str(second)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another subject folder named 'dog'" in err[0] and str(second) in err[0], err
    assert (out / "dog" / "scores.json").read_text() == scores
    assert main(args + ["--subject", str(first)]) == 0  # the same subject again: its own rows, rescored

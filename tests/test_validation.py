"""Validation while training (docs/validation.md): the chained stage I grid is at stage II's size, live
measures reach validation.csv per validation step with the values the measure gave, the toy readers'
measures are right on images with a known answer, and the best-checkpoint option exports the step
with the highest fidelity within the drift budget."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cascade.cli.main import main
from cascade.config import load_config
from cascade.training import TrainRequest, train
from cascade.validation import Measures
from stages.best import BestRule, Keeper, choose


def _sets(make_cfg, *sets):
    return load_config("tiny", [f"models.cache_dir={make_cfg().models.cache_dir}", "stage1.train.num_class_images=2",
                                "stage1.train.validation_images=1", "stage1.train.validation_steps=2",
                                "stage1.sample.steps=2", "stage2.sample.steps=2", *sets])


def _size(tiny: Path, stage: int) -> int:
    return json.loads((tiny / f"stage{stage}" / "unet" / "config.json").read_text())["sample_size"]


def test_chained_stage1_grid_is_at_stage2_size(make_cfg, tiny, subject_dir, tmp_path, one_thread):
    """"a [V] dog" over "a dog" through stage I -> base stage II: a column of two stage II images;
    with the chain off (and no measures) the stage's own grid of "a [V] dog" at stage I's size."""
    s1, s2 = _size(tiny, 1), _size(tiny, 2)
    assert s2 > s1
    for chain, size in ((True, (s2, 2 * s2)), (False, (s1, s1))):
        cfg = _sets(make_cfg, "stage1.train.max_steps=1", f"stage1.validation.chain={str(chain).lower()}")
        train(TrainRequest(1, cfg, str(subject_dir), "dog", output=str(tmp_path / f"run-{chain}")))
        grid = Image.open(tmp_path / f"run-{chain}" / "samples" / "step-000001.png")
        assert grid.size == size, (chain, grid.size)


def test_measures_logged_per_validation_step(make_cfg, subject_dir, tmp_path, one_thread):
    """A measure handed in by the caller sees each validation's images (the "a [V] dog" half and the "a dog"
    half) and what it returns is what validation.csv and the log hold, per step."""
    seen = []

    def measure(subject, klass):
        seen.append((subject.shape, klass.shape))
        return {"fidelity": float(subject.mean()), "drift": float(klass.std()), "calls": float(len(seen))}

    cfg = _sets(make_cfg, "stage1.train.max_steps=4", "stage1.train.sample_every=2", "stage1.train.validation_images=2")
    result = train(TrainRequest(1, cfg, str(subject_dir), "dog", output=str(tmp_path / "run"),
                                measures=Measures(("fidelity", "drift", "calls"), measure, "test")))
    s1 = _size(Path(cfg.models.cache_dir) / "tiny-v1", 1)
    assert seen == [(torch.Size([2, 3, s1, s1]),) * 2] * 2
    lines = (tmp_path / "run" / "validation.csv").read_text().splitlines()
    assert lines[0] == "step,fidelity,drift,calls"
    rows = [dict(zip(lines[0].split(","), map(float, ln.split(",")))) for ln in lines[1:]]
    assert [r["step"] for r in rows] == [2, 4] and [r["calls"] for r in rows] == [1, 2]
    assert rows == [{k: float(v) for k, v in r.items()} for r in result.validation]
    assert all(math.isfinite(r["fidelity"]) and r["drift"] > 0 for r in rows)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert all(re.search(rf"validation step {n} \([0-9.]+ s\), fidelity", log) for n in (2, 4))
    assert (tmp_path / "run" / "validation.png").is_file() and (tmp_path / "run" / "loss.png").is_file()


def test_toy_measures_known_answer():
    """On the toy world's own images (where the readers are exact): 5 subject photos as "a [V] toy",
    and a class batch with 2 subject-looking toys out of 8, of 4 distinct (colour, shape) pairs."""
    from cascade.toy import world
    from cascade.toy.live_measures import measures

    subject = world.to_lowres(world.to_tensor(world.subject_photos()))
    sub = world.SUBJECT
    others = [("red", "circle"), ("green", "triangle"), ("blue", "cross")]
    toys = [world.Toy(sub["colour"], sub["shape"], "plain", 32, 32, 34)] * 2 + \
        [world.Toy(c, s, "plain", 30 + i, 32, 30) for i, (c, s) in enumerate(others * 2)]
    klass = world.to_lowres(world.to_tensor([world.render(t) for t in toys]))
    m = measures(1)
    out = m(subject, klass)
    assert set(out) == set(m.names)
    assert out["fidelity"] == 1.0 and out["drift"] == 2 / 8
    p = [2 / 8] * 4  # each pair twice
    assert out["diversity_bits"] == pytest.approx(-sum(x * math.log2(x) for x in p))

    # stage II, 64 px: the subject's photos show its stripes and emblem; of 3 non-subject class toys one is
    # striped (drift 1/3); unchained (no class samples) there is no drift to report
    photos = world.to_tensor(world.subject_photos())
    klass2 = world.to_tensor([world.render(world.Toy(c, s, pat, 32, 32, 34))
                              for (c, s), pat in zip(others, ("striped", "plain", "dotted"))])
    out2 = measures(2)(photos, klass2)
    assert out2["fidelity"] == 1.0 and out2["emblem"] == 1.0 and out2["drift"] == pytest.approx(1 / 3)
    unchained = measures(2, with_class=False)
    assert "drift" not in unchained.names and "drift" not in unchained(photos, photos[:0])


def test_best_checkpoint_rule_on_a_synthetic_series(tmp_path):
    rule = BestRule("fidelity", "drift", 0.3)
    rows = [{"step": 10, "fidelity": 0.2, "drift": 0.0}, {"step": 20, "fidelity": 0.8, "drift": 0.1},
            {"step": 30, "fidelity": 0.95, "drift": 0.5},  # best fidelity, over the budget
            {"step": 40, "fidelity": 0.8, "drift": 0.2},  # ties step 20: the earlier step stays
            {"step": 50, "fidelity": float("nan"), "drift": 0.0}]
    assert choose(rows, rule)["step"] == 20
    assert choose(rows, BestRule("fidelity", "drift", 1.0))["step"] == 30
    assert choose(rows, BestRule("fidelity", "drift", -1.0)) is None
    model = torch.nn.Linear(2, 1)
    keeper = Keeper(rule, tmp_path)
    picked = []
    for r in rows:  # online, as the trainer offers them: the same answer as choose()
        with torch.no_grad():
            model.weight.fill_(r["step"])
        if keeper.offer(r, model):
            picked.append(r["step"])
    assert picked == [10, 20] and keeper.record["step"] == 20 and "drift <= 0.3" in keeper.record["reason"]
    early = json.loads(json.dumps({**keeper.record, "step": 10}))  # as a checkpoint from before step 20 holds it
    Keeper(rule, tmp_path, early).restore(model)  # a run resumed there takes step 10's weights, not the newest file
    assert torch.all(model.weight == 10)
    keeper.restore(model)
    assert torch.all(model.weight == 20)
    keeper.prune()
    assert sorted(f.name for f in tmp_path.glob("*.safetensors")) == ["step-000020.safetensors"]


def test_best_checkpoint_exports_the_chosen_steps_weights(make_cfg, tiny, subject_dir, tmp_path, one_thread):
    """A scripted measure series over 4 validation steps: fidelity peaks at step 3 but drifts past the
    budget, so step 2 is chosen; the export holds step 2's weights (its checkpoint), and says why."""
    series = iter([(0.1, 0.0), (0.7, 0.1), (0.9, 0.6), (0.5, 0.1)])

    def measure(subject, klass):
        f, d = next(series)
        return {"fidelity": f, "drift": d}

    cfg = _sets(make_cfg, "stage1.train.max_steps=4", "stage1.train.sample_every=1", "stage1.train.checkpoint_every=1",
                "stage1.train.keep_checkpoints=0", "stage1.train.learning_rate=1e-3", "stage1.validation.chain=false",
                "stage1.validation.best_checkpoint=true", "stage1.validation.drift_budget=0.3")
    run = tmp_path / "run"
    result = train(TrainRequest(1, cfg, str(subject_dir), "dog", output=str(run),
                                measures=Measures(("fidelity", "drift"), measure, "scripted")))
    meta = json.loads((run / "export" / "cascade.json").read_text())
    assert meta["best_checkpoint"]["step"] == 2 == result.best["step"]
    assert "drift <= 0.3" in meta["best_checkpoint"]["reason"]
    assert "best checkpoint: step 2" in (run / "log.txt").read_text()
    exported = load_file(str(run / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    for step, same in ((2, True), (4, False)):
        ckpt = load_file(str(run / "checkpoints" / f"checkpoint-{step:06d}" / "model.safetensors"))
        assert all(torch.equal(exported[k], ckpt[k]) for k in ckpt) == same, step


def test_best_checkpoint_with_ema_and_no_eligible_step_names_the_ema_weights(make_cfg, subject_dir, tmp_path,
                                                                              one_thread):
    """EMA and best checkpoint both on, every validation step over the drift budget: the export holds
    the EMA average, and cascade.json says so in both places (it used to name the last step's weights)."""
    def measure(subject, klass):
        return {"fidelity": 0.5, "drift": 0.9}

    cfg = _sets(make_cfg, "stage1.train.max_steps=2", "stage1.train.sample_every=1", "stage1.train.checkpoint_every=2",
                "stage1.train.learning_rate=1e-3", "stage1.validation.chain=false", "stage1.train.ema=true",
                "stage1.train.ema_decay=0.5", "stage1.validation.best_checkpoint=true",
                "stage1.validation.drift_budget=0.3")
    run = tmp_path / "run"
    train(TrainRequest(1, cfg, str(subject_dir), "dog", output=str(run),
                       measures=Measures(("fidelity", "drift"), measure, "scripted")))
    meta = json.loads((run / "export" / "cascade.json").read_text())
    assert meta["weights"] == "ema" and meta["best_checkpoint"]["step"] is None
    assert meta["best_checkpoint"]["reason"].endswith("the EMA weights are exported"), meta["best_checkpoint"]
    exported = load_file(str(run / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    last = load_file(str(run / "checkpoints" / "checkpoint-000002" / "model.safetensors"))
    assert not all(torch.equal(exported[k], last[k]) for k in last)  # not the last step's weights


def test_stage2_validation_upsamples_held_out_photo_and_stage1_samples(make_cfg, tiny, subject_dir, tmp_path,
                                                                      one_thread):
    """holdout=1: one photo leaves the training set; the grid's columns are that photo and stage I's
    "a dog" sample, its rows their stage I-size inputs and the stage II outputs, at stage II's size."""
    s2 = _size(tiny, 2)
    cfg = _sets(make_cfg, "stage2.train.max_steps=1", "stage2.train.validation_images=1",
                "stage2.train.validation_steps=2", "stage2.validation.holdout=1",
                "stage2.validation.chain=true")
    run = tmp_path / "run"
    train(TrainRequest(2, cfg, str(subject_dir), "dog", output=str(run)))
    assert Image.open(run / "samples" / "step-000001.png").size == (2 * s2, 2 * s2)
    log = (run / "log.txt").read_text()
    assert "held out of training" in log and "samples of 'a dog', upsampled" in log


@pytest.mark.parametrize("sets, key", [
    (["stage1.validation.best_checkpoint=true", "stage1.validation.measures=false"], "stage1.validation.best_checkpoint"),
    (["stage1.validation.holdout=1"], "stage1.validation.holdout"),
    (["stage1.validation.chain=true", "stage1.validation.chain_model=/nonexistent/stage2"],
     "stage1.validation.chain_model"),
])
def test_bad_validation_settings_are_one_line(make_cfg, subject_dir, tmp_path, capsys, sets, key):
    cache = make_cfg().models.cache_dir
    argv = ["train", "stage1", "--subject", str(subject_dir), "--class-noun", "dog", "--output", str(tmp_path / "r"),
            "--set", f"models.cache_dir={cache}", *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err
    assert not (tmp_path / "r").exists()


def test_metric_measures_known_answer_and_cache_check(tmp_path, monkeypatch):
    """DINO measures with a (random, tiny) DINO folder: samples equal to the one subject photo give
    fidelity 1 and PRES 1, identical class samples give diversity 0; a hub id absent from the local
    cache is "not available" at once (no network), so no measures are built."""
    import time

    from cascade.evaluation import live_measures
    from cascade.offline.tiny_metrics import build_dino
    from stages import data

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t = time.time()
    assert not live_measures.cached("facebook/dino-vits16")
    assert live_measures.build(tmp_path, "facebook/dino-vits16", "openai/clip-vit-base-patch32") is None
    assert time.time() - t < 2
    photo = tmp_path / "subject"
    photo.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 40)).save(photo / "a.png")
    dino = build_dino(tmp_path / "dino")
    m = live_measures.build(photo, str(dino), "openai/clip-vit-base-patch32")
    assert m.names[:3] == ("fidelity", "drift", "diversity") and "RANDOM" in m.source
    x = data.stack(data.load_folder(photo, 64), 64)
    out = m(x, torch.cat([x, x]))
    assert out["fidelity"] == pytest.approx(1.0, abs=1e-5) and out["drift"] == pytest.approx(1.0, abs=1e-5)
    assert out["diversity"] == pytest.approx(0.0, abs=1e-5) and out["dino"] == out["fidelity"]
    other = data.stack([Image.new("RGB", (64, 64), (20, 200, 240))], 64)
    assert m(other, torch.cat([x, other]))["fidelity"] < 1 - 1e-4


def test_tensorboard_gets_validation_scalars_and_grid(make_cfg, subject_dir, tmp_path, one_thread):
    pytest.importorskip("tensorboardX", reason="the [dev] extra installs tensorboardX")
    cfg = _sets(make_cfg, "stage1.train.max_steps=2", "stage1.train.sample_every=1",
                "stage1.train.report_to=tensorboard")
    train(TrainRequest(1, cfg, str(subject_dir), "dog", output=str(tmp_path / "run"),
                       measures=Measures(("fidelity", "drift"), lambda s, k: {"fidelity": 0.25, "drift": 0.5}, "fixed")))
    raw = b"".join(p.read_bytes() for p in (tmp_path / "run").rglob("events.out.tfevents*"))
    assert b"validation/fidelity" in raw and b"validation/drift" in raw
    assert raw.count(b"\x89PNG") >= 2  # the grid as an image summary at both validation steps

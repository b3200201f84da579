"""From the committed toy weights, a short DreamBooth fine-tune (`cascade train stage1 --config toy`)
binds the identifier to the subject: "a [V] toy" samples take the subject's colour and shape, which
the base model (to which the identifier means nothing) almost never draws."""
from __future__ import annotations

import json


from cascade.cli.main import main
from cascade.config import load_config
from cascade.toy import measure, world


def test_short_finetune_raises_subject_fidelity(tmp_path, one_thread):
    subject = measure.write_subject(tmp_path / "subject")
    assert len(list(subject.glob("*.png"))) == len(world.SUBJECT_POSES)
    cache = f"models.cache_dir={tmp_path / 'cache'}"
    out = tmp_path / "ft"
    assert main(["train", "stage1", "--config", "toy", "--subject", str(subject), "--class-noun", "toy",
                 "--output", str(out), "--max-steps", "40", "--set", "stage1.train.prior_preservation=false",
                 "--set", "stage1.train.sample_every=1000", "--set", cache]) == 0
    token = json.loads((out / "export" / "cascade.json").read_text())["identifier"]
    cfg = load_config("toy", [cache, "stage1.sample.steps=20"])
    seeds = list(range(8))
    base = measure.fidelity(measure.sample_prompt(str(world_root()), cfg, f"a {token} toy", seeds))
    tuned = measure.fidelity(measure.sample_prompt(str(out / "export"), cfg, "a [V] toy", seeds))
    assert base <= 0.25, base  # 1 of 24 colour+shape pairs by chance
    assert tuned >= 0.75 and tuned >= base + 0.5, (base, tuned)


def world_root():
    from cascade.toy.weights import toy_root

    return toy_root() / "stage1"


def test_toy_study_measures_the_three_claims_with_study_sr(tmp_path, one_thread):
    """`cascade toy study` (1 seed, 1-step fine-tunes): claims (a) and (b) from its own samples, claim (c)
    from one `cascade study-sr` sweep: the glyph placed on held-out views (bilinear upsampling places none),
    the glyph drawn on other toys, per SR variant with its training augmentation."""
    import csv

    out = tmp_path / "study"
    assert main(["toy", "study", "--output", str(out), "--seeds", "0", "--samples", "1", "--stage1-steps", "1",
                 "--stage2-steps", "1", "--levels", "0", "--sr-inputs", "1", "--sr-steps", "2",
                 "--variant", "low=0:0", "--variant", "high=250:250:prior",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    claims = {r["claim"] for r in rows}
    assert claims == {"a fidelity", "b drift", "c SR (held-out views)", "c SR (training views)",
                      "c SR (stage I samples)", "c SR (other toys, class prompt)", "c SR (other toys, instance prompt)"}
    sr = [r for r in rows if r["claim"].startswith("c SR")]
    assert {r["model"] for r in sr} == {"bilinear upsampling (no model)", "base", "low (aug 0..0)",
                                        "high (aug 250..250, prior)"}
    assert {r["train_aug"] for r in sr} == {"none", "pretrained", "0:0", "250:250"}
    hit = {r["model"]: float(r["value"]) for r in sr if r["claim"] == "c SR (held-out views)" and r["metric"] ==
           "glyph_hit"}
    # bilinear upsampling draws no stripes, so no place where they stop: it never places the glyph
    assert hit["bilinear upsampling (no model)"] == 0.0 and all(0.0 <= v <= 1.0 for v in hit.values())
    means = json.loads((out / "study-sr" / "results.json").read_text())["means"]
    assert {m["model"] for m in means} == {r["model"] for r in sr} and all("glyph" in m for m in means)
    # study-sr reads the SR detail with the toy world's exact readers: the pretrained SR base never draws
    # the emblem (no toy of the class has one), while the true photos carry stripes and emblem
    truth = world.to_tensor(world.subject_photos())
    assert measure.detail(truth)["stripes"] == 1.0 and measure.detail(truth)["emblem"] == 1.0
    base = [m for m in means if m["model"] == "base" and m["view"] == "training"]
    assert base and all(m["emblem"] == 0.0 and 0.0 <= m["stripes"] <= 1.0 for m in base), base
    assert all("stripes" in m and "emblem" in m for m in means if m["input"] == "stage1")
    table = (out / "study-sr" / "table.md").read_text()
    assert "| glyph placed | glyph drawn | stripes | emblem | glyph drawn anywhere |" in table
    held = [m for m in means if m["view"] == "held-out"]  # fresh renders of the subject, never trained on
    assert held and all(0.0 <= m["glyph_hit"] <= 1.0 for m in held)
    assert (out / "plots.png").stat().st_size > 0 and (out / "study-sr" / "grid-real.png").exists()

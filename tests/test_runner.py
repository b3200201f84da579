"""The cascade runner: chained sampling equals the diffusers pipelines run by hand, T5 runs once,
fine-tuned and base stages mix, bad inputs are refused."""
from __future__ import annotations

import json

import torch

from cascade import models
from cascade.cli.main import main
from cascade.runner import STAGE2_SEED_OFFSET, run_cascade
from cascade.text import TextEncoder


def _pipes(tiny):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    off = dict(safety_checker=None, watermarker=None, feature_extractor=None, requires_safety_checker=False)
    p1 = IFPipeline.from_pretrained(tiny / "stage1", **off)
    p2 = IFSuperResolutionPipeline.from_pretrained(tiny / "stage2", **off)
    for p in (p1, p2):
        p.set_progress_bar_config(disable=True)
    return p1, p2


def _fast_cfg(make_cfg):
    return make_cfg("stage1.sample.steps=3", "stage2.sample.steps=2", "stage2.sample.noise_level=100",
                    "stage1.sample.batch_size=2", "stage2.sample.batch_size=2")


def test_chain_matches_diffusers_pipelines(make_cfg, tiny, tmp_path):
    cfg = _fast_cfg(make_cfg)
    paths = models.resolve(cfg)
    prompts = ["a dog on the beach", "a red toy"]
    res = run_cascade(cfg, paths, prompts, 2, 7, tmp_path / "out", progress=False)
    encoder = TextEncoder(paths.text_encoder, cfg.models.cache_dir)
    emb = encoder.encode(prompts + [""])
    p1, p2 = _pipes(tiny)
    from PIL import Image
    import numpy as np

    for i in range(4):
        prompt, seed = prompts[i // 2], 7 + i
        low = p1(prompt_embeds=emb[prompt], negative_prompt_embeds=emb[""], num_inference_steps=3,
                 guidance_scale=7.0, generator=torch.Generator().manual_seed(seed), output_type="pt").images
        high = p2(image=low, prompt_embeds=emb[prompt], negative_prompt_embeds=emb[""], num_inference_steps=2,
                  guidance_scale=4.0, noise_level=100, output_type="pt",
                  generator=torch.Generator().manual_seed(seed + STAGE2_SEED_OFFSET)).images
        for stage, ref in (("stage1", low), ("stage2", high)):
            ours = np.asarray(Image.open(tmp_path / "out" / stage / f"{i:05d}.png"), dtype=np.int16)
            theirs = ((ref[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy().astype(np.int16)
            assert np.abs(ours - theirs).max() <= 1, f"{stage} image {i} differs from the diffusers pipeline"
    rec = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert rec["images"][3] == {"index": 3, "prompt": "a red toy", "seed_stage1": 10,
                                "seed_stage2": 10 + STAGE2_SEED_OFFSET}
    assert rec["stage2"]["noise_level"] == 100 and rec["random_weights"] is True
    assert (tmp_path / "out" / "grid-stage1.png").is_file() and (tmp_path / "out" / "grid-stage2.png").is_file()
    assert sorted(res.files) == ["stage1", "stage2"]


def test_same_seed_same_images_regardless_of_batching(make_cfg, tmp_path):
    a = run_cascade(_fast_cfg(make_cfg), models.resolve(make_cfg()), ["a dog"], 3, 0, tmp_path / "a",
                    progress=False)
    cfg_b = make_cfg("stage1.sample.steps=3", "stage2.sample.steps=2", "stage2.sample.noise_level=100",
                     "stage1.sample.batch_size=1", "stage2.sample.batch_size=3")
    b = run_cascade(cfg_b, models.resolve(cfg_b), ["a dog"], 3, 0, tmp_path / "b", progress=False)
    import numpy as np
    from PIL import Image

    assert len(a.files["stage2"]) == len(b.files["stage2"]) == 3
    for fa, fb in zip(a.files["stage2"], b.files["stage2"]):
        # per-image generators: batching changes only float summation order (<= 1 grey level)
        da = np.asarray(Image.open(fa), dtype=np.int16) - np.asarray(Image.open(fb), dtype=np.int16)
        assert np.abs(da).max() <= 1
    assert a.files["stage2"][0].read_bytes() != a.files["stage2"][1].read_bytes()


def test_t5_runs_once_per_prompt_set(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("stage1.sample.steps=2", "stage2.sample.steps=1", f"models.cache_dir={tmp_path / 'cache'}")
    import shutil

    shutil.copytree(make_cfg().models.cache_dir + "/tiny-v1", tmp_path / "cache" / "tiny-v1")
    paths = models.resolve(cfg)
    encoder = TextEncoder(paths.text_encoder, cfg.models.cache_dir)
    calls = []
    real = encoder._run_t5
    monkeypatch.setattr(encoder, "_run_t5", lambda prompts: calls.append(list(prompts)) or real(prompts))
    run_cascade(cfg, paths, ["a dog", "a cat", "a dog"], 1, 0, tmp_path / "o1", encoder=encoder, progress=False)
    assert calls == [["a dog", "a cat", ""]]  # one T5 pass feeding both stages
    run_cascade(cfg, paths, ["a dog", "a cat"], 1, 0, tmp_path / "o2", encoder=encoder, progress=False)
    assert len(calls) == 1  # second prompt set: all embeddings from the cache


def test_mix_finetuned_and_base_stages(make_cfg, tiny, tmp_path):
    """A fine-tuned stage I export with the base stage II; [V] is filled from the export."""
    from diffusers import UNet2DConditionModel

    from stages.components import EXPORT_META

    export = tmp_path / "ft1"
    unet = UNet2DConditionModel.from_pretrained(tiny / "stage1", subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)  # a visibly different "fine-tuned" model
    unet.save_pretrained(export / "unet")
    (export / EXPORT_META).write_text(json.dumps({"base": str(tiny / "stage1"), "kind": "full", "stage": 1,
                                                  "identifier": "zir"}))
    cfg = _fast_cfg(make_cfg)
    base = models.resolve(cfg)
    mixed = models.ModelPaths(str(export), base.stage2, "none", base.text_encoder)
    r_base = run_cascade(cfg, base, ["a zir dog"], 1, 0, tmp_path / "base", progress=False)
    r_mix = run_cascade(cfg, mixed, ["a [V] dog"], 1, 0, tmp_path / "mix", progress=False)
    assert r_mix.prompts == ["a zir dog"]
    assert r_base.files["stage1"][0].read_bytes() != r_mix.files["stage1"][0].read_bytes()
    rec = json.loads((tmp_path / "mix" / "samples.json").read_text())
    assert rec["stage1"]["kind"] == "full" and "unet/diffusion_pytorch_model.safetensors" in rec["stage1"]["sha256_16"]
    assert rec["stage2"]["kind"] == "base"


def test_stage3_upscales_to_1024(make_cfg, tmp_path):
    cfg = make_cfg("stage1.sample.steps=2", "stage2.sample.steps=1", "stage3.steps=2", "models.stage3=tiny")
    res = run_cascade(cfg, models.resolve(cfg), ["a dog"], 1, 0, tmp_path / "o", progress=False)
    from PIL import Image

    assert Image.open(res.files["stage3"][0]).size == (1024, 1024)
    assert json.loads((tmp_path / "o" / "samples.json").read_text())["stage3"]["steps"] == 2


def test_sample_bad_inputs(make_cfg, tiny, tmp_path, capsys, caplog):
    cache = make_cfg().models.cache_dir
    base = ["sample", "--set", f"models.cache_dir={cache}", "--set", "stage1.sample.steps=1",
            "--set", "stage2.sample.steps=1"]
    assert main(base + ["--prompt", "a dog", "--num-images", "0", "--output", str(tmp_path / "a")]) == 2
    assert "--num-images" in capsys.readouterr().err
    assert main(base + ["--prompt", "a dog", "--stage1", str(tmp_path / "nope" / "x"),
                        "--output", str(tmp_path / "b")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(base + ["--prompt", "a dog", "--stage1", str(tiny / "stage2"), "--output", str(tmp_path / "c")]) == 2
    assert "stage 2 UNet" in capsys.readouterr().err
    assert main(base + ["--prompt", "a [V] dog", "--output", str(tmp_path / "d")]) == 2
    assert "[V]" in capsys.readouterr().err
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("mine")
    assert main(base + ["--prompt", "a dog", "--output", str(tmp_path / "e")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "e" / "keep.txt").read_text() == "mine"
    long_prompt = "a dog " + " ".join(["on the beach"] * 40)
    with caplog.at_level("WARNING"):
        assert main(base + ["--prompt", long_prompt, "--stage2", "none", "--num-images", "1",
                            "--output", str(tmp_path / "f")]) == 0
    assert any("truncated" in r.message and "on the beach" in r.message for r in caplog.records)
    assert (tmp_path / "f" / "stage1" / "00000.png").is_file() and not (tmp_path / "f" / "stage2").exists()

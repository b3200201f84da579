"""Model cards (README.md in every export) and `cascade push` up to the upload call."""
from __future__ import annotations

import json

import yaml
from PIL import Image

from cascade import model_card
from cascade.cli import push
from cascade.cli.main import main


def _export(tmp_path, **meta):
    run = tmp_path / "run"
    export = run / "export"
    (export / "unet").mkdir(parents=True)
    base = {"base": "DeepFloyd/IF-I-XL-v1.0", "identifier": "sks", "class_noun": "dog", "instance_prompt": "a sks dog",
            "config": "if-xl", "resolution": 64, "stage": 1, "steps": 400, "loss": "hybrid", "lora_rank": 0,
            "kind": "full", "weights": "ema", "ema": {"decay": 0.999, "start_step": 0},
            "training": {"learning_rate": 5e-6, "lr_scheduler": "cosine", "snr_gamma": 5.0, "caption_dropout": 0.1}}
    (export / "cascade.json").write_text(json.dumps({**base, **meta}))
    return run, export


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    fm, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(fm), body


def test_card_has_front_matter_settings_grid_and_measures(tmp_path):
    run, export = _export(tmp_path)
    (run / "samples").mkdir()
    for step, colour in ((100, "red"), (400, "blue")):
        Image.new("RGB", (8, 8), colour).save(run / "samples" / f"step-{step:06d}.png")
    (run / "validation.csv").write_text("step,fidelity,drift\n100,0.41,0.20\n400,0.63,0.31\n")
    fm, body = _split(model_card.write_model_card(export).read_text())
    assert fm["base_model"] == "DeepFloyd/IF-I-XL-v1.0" and fm["license_name"] == "deepfloyd-if-license"
    assert fm["license"] == "other" and fm["instance_prompt"] == "a sks dog" and fm["library_name"] == "diffusers"
    assert {"dreambooth", "deepfloyd-if", "if-stage-i"} <= set(fm["tags"])
    assert "`sks`" in body and "`dog`" in body and "`a sks dog`" in body
    assert "| lr_scheduler | cosine |" in body and "| snr_gamma | 5.0 |" in body and "| ema_decay | 0.999 |" in body
    assert "exponential moving average" in body
    # the last grid (step 400) travels with the export; the last measures row is shown
    assert "![validation grid at step 400](validation.png)" in body
    assert Image.open(export / "validation.png").getpixel((0, 0)) == (0, 0, 255)
    assert "## Measured at step 400" in body and "| fidelity | 0.63 |" in body and "| drift | 0.31 |" in body
    assert 'UNet2DConditionModel.from_pretrained("<this repo>", subfolder="unet")' in body


def test_card_shows_the_chosen_steps_grid_and_no_empty_measures(tmp_path):
    """Issue 27 item 18: with a best checkpoint the card showed the last step's grid and measures, not
    the chosen step's; a run without live measures got an empty "Measured at step" table."""
    run, export = _export(tmp_path, weights="best_checkpoint",
                          best_checkpoint={"step": 100, "reason": "step 100: highest fidelity (0.41)"})
    (run / "samples").mkdir()
    for step, colour in ((100, "red"), (400, "blue")):
        Image.new("RGB", (8, 8), colour).save(run / "samples" / f"step-{step:06d}.png")
    (run / "validation.csv").write_text("step,fidelity,drift\n100,0.41,0.20\n400,0.63,0.31\n")
    _, body = _split(model_card.write_model_card(export).read_text())
    assert "grid of the chosen step (step 100)" in body and "![validation grid at step 100](validation.png)" in body
    assert Image.open(export / "validation.png").getpixel((0, 0)) == (255, 0, 0)
    assert "## Measured at step 100" in body and "| fidelity | 0.41 |" in body and "0.63" not in body
    assert "(chosen checkpoint: step 100)" in body and "step 100: highest fidelity" in body
    (run / "validation.csv").write_text("step\n100\n400\n")  # tiny: validation without live measures
    _, body = _split(model_card.write_model_card(export).read_text())
    assert "Measured" not in body


def test_card_leaves_out_what_the_run_does_not_have(tmp_path):
    run, export = _export(tmp_path, base=str(tmp_path / "local-if"), kind="lora", stage=2, weights="trained",
                          training={"lora_type": "dora"}, lowres_size=64, sample_noise_level=20, noise_aug=[0, 20])
    (tmp_path / "local-if").mkdir()
    fm, body = _split(model_card.write_model_card(export).read_text())
    assert "base_model" not in fm and "dora" in fm["tags"] and "if-stage-ii" in fm["tags"]
    assert "Validation" not in body and "Measured" not in body and not (export / "validation.png").exists()
    assert "load_lora_weights" in body and "IFSuperResolutionPipeline" in body and "the last training step" in body


class FakeApi:
    calls: list = []

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))
        return "commit-1"


def test_push_uploads_the_export_folder_to_the_repo(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    _, export = _export(tmp_path)
    FakeApi.calls = []
    monkeypatch.setattr(push, "hub_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_token")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push", "--repo-id", "me/if-dog", str(export)]) == 0
    (_, repo, kw), (_, up) = FakeApi.calls
    assert repo == "me/if-dog" and kw["exist_ok"] is True and kw["private"] is False
    assert up["folder_path"] == str(export) and up["repo_id"] == "me/if-dog" and up["repo_type"] == "model"
    card = (export / "README.md").read_text()  # written before the upload, naming the repo
    assert 'from_pretrained("me/if-dog", subfolder="unet")' in card
    assert "https://huggingface.co/me/if-dog" in capsys.readouterr().out


def test_push_refuses_offline_and_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    _, export = _export(tmp_path)
    called = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: called.append(1))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", "--repo-id", "me/if-dog", str(export)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be reached (HF_HUB_OFFLINE is set)" in err
    assert main(["push", "--repo-id", "me/if-dog", str(tmp_path)]) == 2
    assert "not a cascade export" in capsys.readouterr().err
    assert main(["push", "--repo-id", "bad id!", str(export)]) == 2
    assert "--repo-id" in capsys.readouterr().err
    assert not called and not (export / "README.md").exists()  # nothing written or sent


def test_unreachable_hub_is_reported(monkeypatch):
    import huggingface_hub

    class Down:
        def head(self, *a, **k):
            raise ConnectionError("name resolution failed")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Down())
    assert push.hub_unreachable() == "ConnectionError: name resolution failed"

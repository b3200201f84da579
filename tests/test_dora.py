"""LoRA variants (train.lora_type=dora, train.lora_targets): a DoRA export of chosen modules reloads
in plain diffusers (IFPipeline.load_lora_weights) and predicts what training produced within 1e-5."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from stages import checkpoint, setup
from stages.errors import InputError
from tests.test_stage1_training import OFF, _fixed_inputs, _predict, train

TARGETS = "to_q,to_v,add_k_proj"


def test_dora_export_reloads_in_diffusers(make_cfg, tiny, subject_dir, tmp_path, one_thread):
    from diffusers import IFPipeline, UNet2DConditionModel

    run = train(make_cfg, subject_dir, tmp_path / "dora", "stage1.train.max_steps=3", "stage1.train.loss=epsilon",
                "stage1.train.learning_rate=1e-2", "stage1.train.prior_preservation=false",
                "stage1.train.batch_size=1", "stage1.train.lora_type=dora", f"stage1.train.lora_targets={TARGETS}",
                extra=["--lora-rank", "4"])
    weights = load_file(str(run / "export" / "pytorch_lora_weights.safetensors"))
    assert any("lora_magnitude_vector" in k for k in weights)  # DoRA's magnitude, not plain LoRA
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights} == set(TARGETS.split(","))
    assert "- dora\n" in (run / "export" / "README.md").read_text()  # the model card's tags

    # the trained model as the trainer left it, rebuilt independently from its checkpoint
    trained = UNet2DConditionModel.from_pretrained(tiny / "stage1", subfolder="unet")
    setup.add_lora(trained, 4, 0, use_dora=True, targets=TARGETS.split(","))
    trained.load_state_dict(load_file(str(checkpoint.latest_checkpoint(run / "checkpoints") / "model.safetensors")))
    trained.eval()

    pipe = IFPipeline.from_pretrained(tiny / "stage1", **OFF)
    inputs = _fixed_inputs(pipe.unet)
    base_pred = _predict(pipe.unet, inputs)
    pipe.load_lora_weights(run / "export")
    loaded = dict(pipe.unet.named_parameters())
    assert sum("lora_magnitude_vector" in n for n in loaded) == sum("lora_magnitude_vector" in k for k in weights)
    loaded_pred = _predict(pipe.unet, inputs)
    assert torch.allclose(loaded_pred, _predict(trained, inputs), atol=1e-5)
    assert (loaded_pred - base_pred).abs().max() > 1e-4  # the adapter really changes the model


def test_unknown_target_is_refused(tiny):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny / "stage1", subfolder="unet")
    with pytest.raises(InputError, match="train.lora_targets: no module named to_x"):
        setup.add_lora(unet, 4, 0, targets=["to_q", "to_x"])

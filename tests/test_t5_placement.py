"""models.text_encoder_device: T5 on the CPU once (the embedding cache), never on the GPU."""
import pytest
import torch

from cascade import models
from cascade.config import ConfigError


def test_text_encoder_device_setting(make_cfg):
    assert models.text_encoder_device(make_cfg()) is None  # auto: the GPU when there is one
    assert models.text_encoder_device(make_cfg("models.text_encoder_device=cpu")) == "cpu"
    with pytest.raises(ConfigError, match="models.text_encoder_device"):
        make_cfg("models.text_encoder_device=gpu0")


def test_t5_on_cpu_loads_in_fp32_not_fp16(monkeypatch, tiny):
    from transformers import T5EncoderModel

    from cascade.text import TextEncoder

    seen = {}
    real = T5EncoderModel.from_pretrained

    def spy(*a, **kw):
        seen["dtype"] = kw.get("dtype")
        return real(*a, **{**kw, "dtype": torch.float32})

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", spy)
    enc = TextEncoder(str(tiny / "stage1"), tiny.parent / "t5-cpu-test", 16, torch.float16, device="cpu")
    out = enc.encode(["a dog"])
    assert seen["dtype"] == torch.float32 and out["a dog"].shape[:2] == (1, 16)

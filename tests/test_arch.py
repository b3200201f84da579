"""The shipped real-architecture configs build (no weights) and have the published parameter counts."""
import pytest

from cascade.perf import arch

# published sizes (model cards / design notes): IF-I-M 0.4B, IF-I-L 0.9B, IF-I-XL 4.3B, IF-II-M 0.45B,
# IF-II-L 1.2B, T5 v1.1 XXL encoder 4.76B. Published figures are rounded, hence the tolerance.
PUBLISHED = {"if-i-m": 0.4e9, "if-i-l": 0.9e9, "if-i-xl": 4.3e9, "if-ii-m": 0.45e9, "if-ii-l": 1.2e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_unet_parameter_count_matches_published(name):
    unet = arch.build_unet(name)  # meta device: no memory
    n = arch.n_params(unet)
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.08, f"{name}: {n / 1e9:.3f}B"
    assert arch.load(name)["published_params"] == PUBLISHED[name]
    cfg = unet.config
    assert cfg.in_channels == (3 if "-i-" in name else 6) and cfg.out_channels == 6
    assert cfg.mid_block_type == "UNetMidBlock2DSimpleCrossAttn" and cfg.encoder_hid_dim == 4096


def test_t5_encoder_parameter_count():
    n = arch.n_params(arch.build_t5())
    assert abs(n - 4.76e9) / 4.76e9 < 0.01, n


def test_hub_ids_of_presets_resolve_to_shipped_configs():
    from cascade.config import load_config

    for preset in ("if-m", "if-l", "if-xl"):
        cfg = load_config(preset)
        assert arch.arch_for(cfg.models.stage1) in arch.UNETS
        assert arch.arch_for(cfg.models.stage2) in arch.UNETS
    assert arch.arch_for("tiny") is None

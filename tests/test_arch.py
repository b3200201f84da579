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


def test_if_ii_l_has_the_hub_configs_parameter_count():
    """1,243,277,190 with the widths read from a copy of its hub config (the fitted widths gave 1.148B)."""
    assert arch.n_params(arch.build_unet("if-ii-l")) == 1_243_277_190


@pytest.mark.parametrize("name", ["if-i-m", "if-i-l", "if-i-xl"])
def test_stage1_scale_settings_are_diffusers_defaults(name):
    """convert_if.py's stage-I converter sets none of them; IF-I-XL's hub config has the defaults."""
    cfg = arch.build_unet(name).config
    assert (cfg.resnet_skip_time_act, cfg.resnet_out_scale_factor, cfg.mid_block_scale_factor) == (False, 1.0, 1)
    assert not cfg.only_cross_attention


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_provenance_names_real_fields(name):
    unet = arch.load(name)["unet"]
    prov = arch.load(name)["provenance"]
    named = [f for fields in prov.values() for f in fields]
    assert len(named) == len(set(named)), "a field has two provenances"
    assert set(named) <= set(unet) | {"sample_size"}, set(named) - set(unet)

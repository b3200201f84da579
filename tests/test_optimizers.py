"""train.optimizer: AdamW, 8-bit AdamW, Adafactor (transformers), Prodigy (prodigyopt) are built from
the config key and train; a missing package is refused in one line, early and where it is built."""
from __future__ import annotations

import os

import pytest
import torch

from cascade.config import ConfigError, load_config
from stages import setup
from stages.optimizers import factory
from stages.errors import InputError
from tests.conftest import hide_packages


def _train(opt, params, steps=30):
    target = torch.linspace(-1, 1, params[0].numel()).view_as(params[0])
    losses = []
    for _ in range(steps):
        loss = (params[0] - target).pow(2).sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


@pytest.mark.parametrize("name,cls,lr", [("adamw", "torch.optim.adamw.AdamW", 1e-2),
                                         ("adafactor", "transformers.optimization.Adafactor", 1e-2),
                                         ("prodigy", "prodigyopt.prodigy.Prodigy", 1.0)])
def test_each_optimizer_is_built_from_the_key_and_trains(name, cls, lr):
    cfg = load_config("tiny", [f"stage1.train.optimizer={name}", f"stage1.train.learning_rate={lr}",
                               "stage1.train.fused_optimizer=false"]).stage1.train
    params = [torch.nn.Parameter(torch.zeros(4, 8))]
    opt, label = factory.build(params, cfg)
    assert f"{type(opt).__module__}.{type(opt).__name__}" == cls and label == name
    assert opt.param_groups[0]["lr"] == lr  # the LR schedule drives this value
    losses = _train(opt, params)
    assert losses[-1] < 0.5 * losses[0]


def test_8bit_spellings_agree():
    a = load_config("tiny", ["stage1.train.optimizer=adamw8bit"]).stage1.train
    b = load_config("tiny", ["stage1.train.use_8bit_adam=true"]).stage1.train
    assert (a.optimizer, a.use_8bit_adam) == (b.optimizer, b.use_8bit_adam) == ("adamw8bit", True)


@pytest.mark.parametrize("name,package", [("prodigy", "prodigyopt"), ("adafactor", "transformers"),
                                          ("adamw8bit", "bitsandbytes")])
def test_missing_package_is_refused_in_one_line(monkeypatch, name, package):
    hide_packages(monkeypatch, package, "torchao")  # torchao's AdamW8bit would stand in for bitsandbytes' on fp32
    cfg = load_config("tiny", [f"stage1.train.optimizer={name}"]).stage1.train
    with pytest.raises(InputError, match=f"{package}") as e:
        setup.early_checks(cfg)  # before any model loads
    assert "\n" not in str(e.value)
    if name != "adamw8bit":
        with pytest.raises(InputError, match=f"needs the {package} package"):
            factory.build([torch.nn.Parameter(torch.zeros(2))], cfg)


def test_bad_combinations_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="stage1.train.optimizer"):
        load_config("tiny", ["stage1.train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="use_8bit_adam"):
        load_config("tiny", ["stage1.train.optimizer=prodigy", "stage1.train.use_8bit_adam=true"])
    with pytest.raises(ConfigError, match="weights_dtype=float32"):
        load_config("tiny", ["stage1.train.optimizer=adafactor", "stage1.train.weights_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="optimizer_in_backward"):
        load_config("tiny", ["stage1.train.optimizer=prodigy", "stage1.train.optimizer_in_backward=true"])



def test_8bit_adamw_on_fp32_weights_is_bitsandbytes_where_torchao_is_absent(monkeypatch):
    """The factory steps 8-bit AdamW with torchao's where it is installed (tests/test_torchao_train.py), else
    with bitsandbytes'; the name it logs says which library steps."""
    pytest.importorskip("bitsandbytes")
    hide_packages(monkeypatch, "torchao")
    cfg = load_config("tiny", ["stage1.train.use_8bit_adam=true", "stage1.train.learning_rate=0.05"]).stage1.train
    params = [torch.nn.Parameter(torch.zeros(64, 64))]  # 4096 values: 8-bit moments
    opt, name = factory.build(params, cfg)
    assert name == "adamw8bit-bitsandbytes" and type(opt).__module__.startswith("bitsandbytes"), (name, type(opt))
    setup.early_checks(cfg)  # bitsandbytes is there: no refusal
    losses = _train(opt, params)
    assert losses[-1] < 0.5 * losses[0]


def test_under_deepspeed_8bit_adamw_is_bitsandbytes_even_where_torchao_is_installed(monkeypatch):
    """ZeRO takes per-parameter views of the flat partition's state, which torchao's 8-bit state refuses
    (tests/test_optimizers_torchao.py): the trainer passes deepspeed=True and gets bitsandbytes'."""
    import importlib.util

    from stages.optimizers import torchao_lowbit

    pytest.importorskip("bitsandbytes")
    hidden = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "torchao" else hidden(n, *a))
    monkeypatch.setattr(torchao_lowbit, "make", lambda *a, **k: (torch.optim.SGD(a[0], lr=0.1), "torchao stand-in"))
    cfg = load_config("tiny", ["stage1.train.use_8bit_adam=true"]).stage1.train
    params = [torch.nn.Parameter(torch.zeros(64, 64))]
    assert factory.build(params, cfg)[1] == "adamw8bit-torchao"
    opt, name = factory.build(params, cfg, deepspeed=True)
    assert name == "adamw8bit-bitsandbytes" and type(opt).__module__.startswith("bitsandbytes"), (name, type(opt))


def test_each_rank_of_a_launch_compiles_into_its_own_inductor_cache(monkeypatch, tmp_path):
    """torchao's compiled step is cached under the global shape; ranks with different shards must not share
    it (tests/test_torchao_train.py shows the wrong step a shared cache gives). One process keeps the cache."""
    from stages.optimizers import torchao_lowbit

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "1")
    torchao_lowbit._own_compile_cache_per_rank()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for _ in range(2):  # once per process, however often the optimizer is built
        torchao_lowbit._own_compile_cache_per_rank()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "rank1-of-2")


def test_8bit_adamw_on_fp32_weights_needs_only_one_of_torchao_and_bitsandbytes(monkeypatch):
    """Without bitsandbytes, torchao steps 8-bit AdamW on fp32 weights; bf16 weights still need bitsandbytes
    (ours quantises with its maps)."""
    import importlib.util

    hide_packages(monkeypatch, "bitsandbytes")
    hidden = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "torchao" else hidden(n, *a))
    setup.early_checks(load_config("tiny", ["stage1.train.use_8bit_adam=true"]).stage1.train)
    bf16 = load_config("tiny", ["stage1.train.use_8bit_adam=true", "stage1.train.weights_dtype=bfloat16"])
    with pytest.raises(InputError, match=r"needs bitsandbytes: pip install 'cascade-dreambooth\[bnb\]'$"):
        setup.early_checks(bf16.stage1.train)

"""The table of what composes (cascade/compat.py): every refused cell is refused by the config check in
its own line naming both settings, every running cell passes it, the issue-26 pairs are refused, and no
preset ships a refused combination with any accelerate config we ship. Training the running cells on
their real engines: tests/test_compat_train.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cascade import compat
from cascade.config import CONFIG_DIR, Config, ConfigError, load_config
from cascade.config_checks import validate

ACCELERATE_CONFIGS = sorted((CONFIG_DIR / "accelerate").glob("*.yaml"))


def apply(cell: compat.Cell, train):
    """Set a Train section to a cell's choices (the inverse of compat.cell_of)."""
    train.optimizer, train.use_8bit_adam = cell.optimizer, cell.optimizer == "adamw8bit"
    train.weights_dtype, train.optimizer_states = cell.weights, cell.states
    train.optimizer_in_backward, train.offload_optimizer = cell.in_backward, cell.offload
    train.lora_rank, train.lora_type = (0, "lora") if cell.adapter == "none" else (4, cell.adapter)
    train.ema, train.mixed_precision = cell.ema, cell.mixed_precision


def test_every_cell_runs_or_is_refused_in_its_own_line():
    cfg = load_config("tiny")
    counts, running = {"runs": 0, "refused": 0}, []
    for cell in compat.cells():
        apply(cell, cfg.stage1.train)
        apply(cell, cfg.stage2.train)  # validate checks both stages; stage I's refusal comes first
        why = compat.verdict(cell)
        assert compat.cell_of(cfg.stage1.train, cell.engine) == cell
        if why is None:
            validate(cfg, cell.engine)
            counts["runs"] += 1
            running.append(cell)
            continue
        with pytest.raises(ConfigError) as e:
            validate(cfg, cell.engine)
        rule = compat.refusing_rule(cell)
        assert str(e.value) == f"config 'stage1.train.{compat.KEY[rule.axes[0]]}': {why}", cell
        assert "\n" not in why and all(cell.describe(a) in why for a in rule.axes)
        counts["refused"] += 1
    assert counts["runs"] + counts["refused"] == len(list(compat.cells())) > 10_000
    # every value of every axis runs somewhere (the rules refuse pairs, never a whole option)
    assert all({getattr(c, a) for c in running} == set(values) for a, values in compat.AXES.items()), counts
    assert all(any(r.when(c) for c in compat.cells()) for r in compat.RULES)  # no dead rule


@pytest.mark.parametrize("engine,sets,names", [
    # 1. DeepSpeed + in-backward: our hook frees the gradient DeepSpeed's hook reads next
    ("zero2", ["stage1.train.optimizer_in_backward=true"], ("optimizer_in_backward=true", "engine zero2")),
    ("zero3", ["stage1.train.optimizer_in_backward=true"], ("optimizer_in_backward=true", "engine zero3")),
    # 2. FSDP2 + bf16 weights (8-bit, bf16 or fp32 states), and bf16 states on fp32 DTensors (8-bit: below)
    ("fsdp2", ["stage1.train.weights_dtype=bfloat16", "stage1.train.use_8bit_adam=true"],
     ("weights_dtype=bfloat16", "engine fsdp2")),
    ("fsdp2", ["stage1.train.weights_dtype=bfloat16"], ("weights_dtype=bfloat16", "silently become fp32")),
    ("fsdp2", ["stage1.train.optimizer_states=bf16"], ("optimizer_states=bf16", "engine fsdp2")),
    # 3. offload swaps the optimizer for DeepSpeedCPUAdam: only plain AdamW with fp32 states
    ("zero2-offload", ["stage1.train.offload_optimizer=true", "stage1.train.optimizer=prodigy",
                       "stage1.train.learning_rate=1.0"], ("optimizer=prodigy", "offload_optimizer=true")),
    ("zero2-offload", ["stage1.train.offload_optimizer=true", "stage1.train.optimizer=adafactor"],
     ("optimizer=adafactor", "DeepSpeedCPUAdam")),
    ("zero2", ["stage1.train.offload_optimizer=true", "stage1.train.optimizer_states=bf16"],
     ("optimizer_states=bf16", "offload_optimizer=true")),
    ("zero2-offload", ["stage1.train.offload_optimizer=true", "stage1.train.optimizer=adamw8bit"],
     ("optimizer=adamw8bit", "offload_optimizer=true")),
    ("zero2-offload", ["stage1.train.optimizer=prodigy"], ("optimizer=prodigy", "engine zero2-offload")),
    # 4. fp16 weights + fp16 mixed precision: the GradScaler cannot unscale fp16 gradients
    ("single", ["stage1.train.weights_dtype=float16", "stage1.train.mixed_precision=fp16"],
     ("weights_dtype=float16", "mixed_precision=fp16")),
])
def test_issue_26_pairs_are_refused_naming_both_settings(engine, sets, names):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", sets, engine=engine)
    assert all(n in str(e.value) for n in names), str(e.value)
    assert "\n" not in str(e.value)
    if sets:  # the flag the user typed is named
        assert str(e.value).startswith("--set stage1.train.")


def test_fsdp2_with_8bit_adamw_runs_on_torchao_and_without_it_names_the_extra(monkeypatch, cli, photos, tmp_path):
    """FSDP2 + 8-bit AdamW on fp32 weights runs where torchao is installed (its AdamW8bit steps DTensors:
    tests/test_torchao_train.py trains it); without torchao it is one line naming both settings and the extra,
    before any model loads or folder is made (bitsandbytes' AdamW8bit crashed there at step 1)."""
    from tests.conftest import error_line, hide_packages

    cell = compat.Cell("fsdp2", "adamw8bit")
    monkeypatch.setattr(compat, "installed", lambda package: True)
    assert compat.verdict(cell) is None
    load_config("tiny", ["stage1.train.use_8bit_adam=true"], engine="fsdp2")
    monkeypatch.undo()
    hide_packages(monkeypatch, "torchao")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["stage1.train.optimizer=adamw8bit"], engine="fsdp2")
    line = str(e.value)
    assert line.startswith("--set stage1.train.optimizer: train.optimizer=adamw8bit and engine fsdp2:") and \
        "pip install 'cascade-dreambooth[torchao]'" in line and "\n" not in line, line
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports for configs/accelerate/fsdp.yaml
    code, err = cli("train", "stage1", "--subject", photos, "--class-noun", "dog", "--output", tmp_path / "o",
                    "--set", "stage1.train.use_8bit_adam=true")
    assert code == 2 and "cascade-dreambooth[torchao]" in error_line(err) and not (tmp_path / "o").exists()


def test_zero_with_8bit_adamw_is_bitsandbytes_and_without_it_names_the_extra(monkeypatch):
    """Under DeepSpeed 8-bit AdamW is always bitsandbytes' (torchao's 8-bit state refuses the views ZeRO takes:
    tests/test_optimizers_torchao.py), so torchao alone does not make the cell run."""
    import importlib.util

    from tests.conftest import hide_packages

    assert compat.verdict(compat.Cell("zero2", "adamw8bit")) is None  # bitsandbytes is installed here
    hide_packages(monkeypatch, "bitsandbytes")
    hidden = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "torchao" else hidden(n, *a))
    for engine in ("zero2", "zero3"):
        with pytest.raises(ConfigError) as e:
            load_config("tiny", ["stage1.train.use_8bit_adam=true"], engine=engine)
        line = str(e.value)
        assert f"train.optimizer=adamw8bit and engine {engine}:" in line and "cascade-dreambooth[bnb]" in line, line
    load_config("tiny", ["stage1.train.use_8bit_adam=true"], engine="fsdp2")  # torchao's steps FSDP2's DTensors


def test_auto_precision_resolving_to_fp16_is_judged_as_fp16(monkeypatch):
    """mixed_precision=auto on a GPU without bf16 becomes fp16: fp16 weights are refused there, not at step 1."""
    sets = ["stage1.train.weights_dtype=float16", "stage1.train.mixed_precision=auto"]
    load_config("tiny", sets, engine="single")  # CPU: auto is "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="weights_dtype=float16 and train.mixed_precision=fp16"):
        load_config("tiny", sets, engine="single")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # auto is bf16: bf16 weights run
    assert load_config("tiny", ["stage1.train.weights_dtype=bfloat16", "stage1.train.mixed_precision=auto"],
                       engine="single").stage1.train.weights_dtype == "bfloat16"


def test_the_engine_comes_from_the_launchers_environment(monkeypatch, tmp_path):
    engines = {p.stem: compat.accelerate_file_engine(p) for p in ACCELERATE_CONFIGS}
    assert engines == {"ddp": "ddp", "deepspeed-zero2-offload": "zero2-offload", "deepspeed-zero2": "zero2",
                       "deepspeed-zero3": "zero3", "fsdp": "fsdp2"}
    assert compat.current_engine({}) == "single" and compat.current_engine({"WORLD_SIZE": "1"}) == "single"
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}')
    assert compat.current_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}) \
        == "zero2-offload"
    # under a launch the config check sees the engine without being told
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ConfigError, match="engine zero2"):
        load_config("tiny", ["stage1.train.optimizer_in_backward=true"])


PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("preset", [None, *PRESETS])
@pytest.mark.parametrize("accelerate", [None, *ACCELERATE_CONFIGS], ids=lambda p: p and Path(p).stem)
def test_no_preset_ships_a_refused_combination(preset, accelerate):
    """Every preset (and the built-in defaults) with every accelerate config we ship, and alone."""
    engine = compat.accelerate_file_engine(accelerate) if accelerate else "single"
    cfg = load_config(preset, engine=engine) if preset else Config()
    validate(cfg, engine)
    for stage in (cfg.stage1, cfg.stage2):
        assert compat.verdict(compat.cell_of(stage.train, engine)) is None


def test_if_xl_keeps_its_single_gpu_plan_and_offloads_under_zero_offload():
    """engine_settings replace only what an engine refuses; the offload header's promise holds."""
    one = load_config("if-xl", engine="single").stage1.train
    assert (one.weights_dtype, one.use_8bit_adam, one.optimizer_in_backward) == ("bfloat16", True, True)
    off = load_config("if-xl", engine="zero2-offload").stage1.train
    assert off.offload_optimizer and off.weights_dtype == "float32" and not off.optimizer_in_backward
    header = (CONFIG_DIR / "accelerate" / "deepspeed-zero2-offload.yaml").read_text()
    assert "if-xl" in header and "offload_optimizer" in header
    # --set still wins over the preset's engine settings
    mine = load_config("if-xl", ["stage1.train.weights_dtype=bfloat16"], engine="ddp").stage1.train
    assert mine.weights_dtype == "bfloat16" and not mine.optimizer_in_backward


def test_engine_settings_are_checked_on_every_machine(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine_settings:\n  zero4: {optimizer_in_backward: false}\n")
    with pytest.raises(ConfigError, match="engine_settings.zero4: not an engine"):
        load_config(bad)
    bad.write_text("engine_settings:\n  ddp: {optimizer_in_backwards: false}\n")
    with pytest.raises(ConfigError, match="engine_settings.ddp.optimizer_in_backwards"):
        load_config(bad)


def test_if_presets_map_the_papers_sr_levels_as_the_study_does():
    """The paper's 1e-3 -> 1e-5 is IF level 0 -> (nothing IF can express): docs/sr-study.md."""
    for preset in ("if-xl", "if-l", "if-m"):
        text = (CONFIG_DIR / f"{preset}.yaml").read_text()
        assert "IF levels ~1 -> 0" not in text and "1e-3 is IF level 0" in text, preset


def test_a_refused_launch_is_one_line_before_any_folder(cli, photos, tmp_path, monkeypatch):
    """`accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml` with in-backward: exit 2,
    one line naming both settings, no run folder (it crashed at step 1 before)."""
    from tests.conftest import error_line

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    code, err = cli("train", "stage1", "--subject", photos, "--class-noun", "dog", "--output", tmp_path / "o",
                    "--set", "stage1.train.optimizer_in_backward=true")
    assert code == 2 and "optimizer_in_backward=true and engine zero2" in error_line(err)
    assert not (tmp_path / "o").exists()

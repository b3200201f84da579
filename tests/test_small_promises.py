"""Issue 17 item 19: settings keep the text as typed, YAML words are no identifiers, the help names
every preset, the log says where an identifier came from, third-party notices stay off the console."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascade.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_string_settings_are_never_yaml():
    cfg = load_config(None, ["models.stage1=!weird", "models.stage2=a #1", "models.variant=null",
                             "models.text_encoder='quoted'", "models.stage3=on"])
    assert (cfg.models.stage1, cfg.models.stage2, cfg.models.variant) == ("!weird", "a #1", None)
    assert (cfg.models.text_encoder, cfg.models.stage3) == ("quoted", "on")
    assert load_config(None, ["stage1.train.learning_rate=1e-5"]).stage1.train.learning_rate == 1e-5  # numbers: YAML


@pytest.mark.parametrize("word", ["yes", "no", "true", "off", "null", "Yes"])
def test_yaml_words_are_not_identifiers(word):
    from cascade.identifier import IdentifierError, check_identifier

    with pytest.raises(IdentifierError, match="common word"):
        check_identifier(word, "dog")
    assert check_identifier("zq", "dog") == "zq"


def test_config_help_names_every_preset(capsys):
    from cascade.cli.main import main

    assert main(["sample", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in ("tiny", "toy", "if-m", "if-l", "if-xl")) and "default tiny" in text
    assert main(["demo", "--help"]) == 0
    assert "default toy" in " ".join(capsys.readouterr().out.split())


def test_the_log_says_where_the_identifier_came_from(make_cfg, caplog):
    from cascade import training

    req = training.TrainRequest(1, make_cfg("identifier.token=zq"), "s", "dog")
    with caplog.at_level(logging.INFO):
        assert training._pick_identifier(req, "unused") == "zq"
    assert "from identifier.token / --identifier" in caplog.text and "(given)" not in caplog.text


def test_torchvision_notice_is_dropped(caplog):
    import cascade  # noqa: F401 - installs the filters

    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`ViTImageProcessor` requires torchvision (not installed); falling back to `ViTImageProcessorPil`")
        logging.getLogger("transformers.utils.import_utils").warning("a warning that matters")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels")
    assert "torchvision" not in caplog.text and "gemm_4bit" not in caplog.text and "a warning that matters" in caplog.text


def test_deepspeed_cpu_notice_is_silenced():
    pytest.importorskip("deepspeed")
    code = ("from cascade.runs.folders import console_logging; console_logging(); "
            "from deepspeed.accelerator import get_accelerator; print(get_accelerator()._name)")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: DeepSpeed picks cuda and prints no CPU notice anyway")
    assert r.returncode == 0 and r.stdout.strip().endswith("cpu"), r.stderr[-2000:]
    assert "Setting accelerator to CPU" not in r.stdout + r.stderr

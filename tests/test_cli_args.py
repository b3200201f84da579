"""Command-line values are parsed as what they are (issue 9, item 10): typed flags never go through
YAML, `--set` may, and every error names the flag or key the user typed."""
from __future__ import annotations

import pytest

from cascade.cli.main import _train_flags, main, parse_args
from cascade.config import ConfigError, load_config


def _cfg(*argv, stage="stage2"):
    args = parse_args(["train", stage, "--subject", "s", "--class-noun", "dog", *argv])
    return load_config(None, args.overrides, _train_flags(args))


def test_noise_aug_is_two_integers_not_yaml():
    t = _cfg("--noise-aug", "5:5").stage2.train
    assert (t.noise_aug_min, t.noise_aug_max) == (5, 5)  # YAML 1.1 reads "5:5" as 305
    t = _cfg("--noise-aug", "7").stage2.train
    assert (t.noise_aug_min, t.noise_aug_max) == (7, 7)
    for bad in ("5:5:5", "a:b", "-1:3", "1.5"):
        with pytest.raises(ConfigError, match="--noise-aug") as e:
            _cfg(f"--noise-aug={bad}")
        assert "--set" not in str(e.value)


def test_range_errors_name_the_flag_typed():
    with pytest.raises(ConfigError) as e:
        _cfg("--noise-aug", "5:1000")
    assert str(e.value).startswith("--noise-aug:") and "--set" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        _cfg("--noise-aug", "30:10")
    assert str(e.value).startswith("--noise-aug:")
    with pytest.raises(SystemExit) as e:  # a count is checked as argparse parses it (cascade.cli.flags)
        _cfg("--max-steps", "0", stage="stage1")
    assert e.value.code == 2
    with pytest.raises(ConfigError) as e:  # the same key given by --set names --set
        _cfg("--set", "stage1.train.max_steps=0", stage="stage1")
    assert str(e.value).startswith("--set stage1.train.max_steps:")


def test_string_flags_are_kept_whole():
    assert _cfg("--model", "models #1/stage1", stage="stage1").models.stage1 == "models #1/stage1"
    assert _cfg("--model", "my: model").models.stage2 == "my: model"
    for token in ("on", "123", "[V]", "yes", "null"):
        assert _cfg("--identifier", token).identifier.token == token


def test_set_keeps_strings_and_names_key_on_errors():
    cfg = load_config(None, ["models.stage1=models #1/stage1", "identifier.token=on", "models.variant=null",
                             "stage1.train.learning_rate=1e-5", "models.stage2='quoted: yes'"])
    assert cfg.models.stage1 == "models #1/stage1" and cfg.identifier.token == "on"
    assert cfg.models.variant is None and cfg.stage1.train.learning_rate == 1e-5
    assert cfg.models.stage2 == "quoted: yes"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["stage1.train.max_steps=abc"])
    msg = str(e.value)
    assert msg.startswith("--set stage1.train.max_steps:") and "must be an integer" in msg and "<class" not in msg
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config(None, ["stage1.train.hflip=3"])
    with pytest.raises(ConfigError, match=r"--set stage1.train.max_steps: value .* not valid YAML"):
        load_config(None, ["stage1.train.max_steps=[1"])


@pytest.mark.parametrize("token,reason", [("on", "common word"), ("123", "has no letters"),
                                          ("[V]", "placeholder")])
def test_identifier_flag_checked_as_the_string_given(make_cfg, subject_dir, tmp_path, capsys, token, reason):
    cache = make_cfg().models.cache_dir
    code = main(["train", "stage1", "--subject", str(subject_dir), "--class-noun", "dog", "--identifier", token,
                 "--set", f"models.cache_dir={cache}", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and reason in err and repr(token) in err
    assert not (tmp_path / "o").exists()


def test_bad_noise_aug_exits_2_before_anything(tmp_path, capsys):
    code = main(["train", "stage2", "--subject", str(tmp_path), "--class-noun", "dog", "--noise-aug", "5:5:5",
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "--noise-aug '5:5:5'" in capsys.readouterr().err and not (tmp_path / "o").exists()

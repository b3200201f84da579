"""Typed run configuration: YAML presets, validation with errors that name the key, dotted overrides.

The schema (its dataclasses, whose defaults are the `tiny` preset) is cascade/config_schema.py.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml

from cascade.config_schema import Config, Identifier, Models, Sample, Stage, Study, Train, Validation  # noqa: F401
from stages.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SEED_MAX = 2**32 - 1  # seeds + image index + stage offsets stay far inside torch's signed 64-bit seeds


class ConfigError(InputError):
    """A bad configuration value; the message names the key (and file or flag) at fault."""

    def __init__(self, message: str, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key, self.detail = key, detail


def _allowed(tp) -> tuple:
    """Python types a YAML value may have for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(tp) for t in _allowed(a))
    if tp is float:
        return (float, int)
    if tp is type(None):
        return (type(None),)
    return (tp,)


def type_name(tp) -> str:
    """A readable name for a field annotation ("an integer", not "<class 'int'>")."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
             list: "a list", dict: "a mapping"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return names.get(tp, getattr(tp, "__name__", str(tp)))


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")


def _merge(obj, data: dict, where: str, prefix: str = "", from_file: bool = False):
    """Merge `data` into the dataclass `obj`. Values read from a file (`from_file`) are never quoted
    in an error, only their type: the UI lets anyone name any readable file as the preset."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in hints:
            if from_file and not _KEY.match(str(key)):  # not a setting's name: say where, not what
                raise ConfigError(f"{where}: an unknown config key under '{prefix.rstrip('.') or 'top level'}'")
            raise ConfigError(f"{where}: unknown config key '{dotted}'")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, where, dotted + ".", from_file)
            continue
        allowed = _allowed(hints[key])
        if float in allowed and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            got = type_name(type(value)) if from_file else repr(value)
            raise ConfigError(f"{where}: '{dotted}' must be {type_name(hints[key])}, got {got}", dotted)
        setattr(obj, key, float(value) if allowed[0] is float and not isinstance(value, bool) else value)


def _field_type(cfg: Config, parts: list[str]):
    """The annotation of a dotted key, or None when the key does not exist (then _merge names it)."""
    obj = cfg
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
        if not dataclasses.is_dataclass(obj):
            return None
    return typing.get_type_hints(type(obj)).get(parts[-1])


def _nested(parts: list[str], value) -> dict:
    nested: dict = {}
    cursor = nested
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def _set_override(cfg: Config, item: str) -> str:
    """Apply one `--set key=value`: the value is YAML, except for string settings, which keep the
    text as typed (YAML would cut "models #1" at the '#', or make "on" a boolean). Returns the key."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    tp = _field_type(cfg, parts)
    if tp is not None and str in _allowed(tp):  # never YAML: "!weird" is a name, not a YAML tag
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        nullable = type(None) in _allowed(tp) and raw.strip() in ("null", "~", "Null", "NULL")
        value = None if nullable else raw[1:-1] if quoted else raw
        _merge(cfg, _nested(parts, value), f"--set {key}")
        return ".".join(parts)
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    _merge(cfg, _nested(parts, value), f"--set {key}")
    return ".".join(parts)


def yaml_where(e: yaml.YAMLError) -> str:
    """Where a YAML file is broken, in one line that quotes none of its content (the file may be any
    file the user can read): "at line L, column C (what the parser found)", quoted text elided."""

    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(no position given)"
    # the parser's token names ('<scalar>', ',', '}') are kept; any other quoted text is elided
    keep = re.compile(r"'(<[a-z ]+>|[^\w\s]{1,2})'")
    problem = re.sub(r"'[^']*'|\"[^\"]*\"", lambda m: m[0] if keep.fullmatch(m[0]) else "…",
                     str(getattr(e, "problem", "") or ""))
    problem = " ".join(problem.split())
    return where + (f" ({problem[:120]})" if problem else "")


def set_value(cfg: Config, key: str, value, flag: str):
    """Set a typed value from a command-line flag (no YAML); errors name the flag."""
    _merge(cfg, _nested(key.split("."), value), flag)


def resolve_path(name: str | Path) -> Path:
    """A preset name (tiny, if-xl) or a YAML path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{name}.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                flags: list[tuple[str, str, object]] | None = None, engine: str | None = None) -> Config:
    """Preset/YAML (with its engine_settings for `engine`, default: the launcher's), then typed `flags`
    (flag name, dotted key, value), then `--set` overrides. An invalid value is reported with the flag
    or `--set` the user typed, when it came from one."""
    cfg = Config()
    if path is not None:
        p = resolve_path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML {yaml_where(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        _merge(cfg, data, str(p), from_file=True)
        _apply_engine_settings(cfg, str(p), engine)
    source = {}
    for flag, key, value in flags or []:
        set_value(cfg, key, value, flag)
        source[key] = flag
    for item in overrides or []:
        source[_set_override(cfg, item)] = f"--set {item.split('=', 1)[0].strip()}"
    from cascade.config_checks import validate

    try:
        validate(cfg, engine)
    except ConfigError as e:
        if e.key in source:
            raise ConfigError(f"{source[e.key]}: {e.detail} (config key {e.key})", e.key, e.detail) from None
        raise _unquoted(e, cfg) from None
    return cfg


def _unquoted(e: ConfigError, cfg: Config) -> ConfigError:
    """A check's error about a value that came from the config file, with the value's text left out:
    the checks quote the value (which helps for a typed flag), but a file's text is never shown."""
    value = cfg
    for part in (e.key or "").split("."):
        value = getattr(value, part, None)
    if not isinstance(value, str):
        return e
    text = re.sub(r"'([^']*)'", lambda m: "<text from the file>" if m.group(1) and m.group(1) in value else m.group(0),
                  str(e))
    return ConfigError(text, e.key, e.detail)


def _apply_engine_settings(cfg: Config, where: str, engine: str | None = None):
    """Every engine's entry is checked (a typo fails on any machine); this process's engine's is applied."""
    from cascade import compat

    engine = engine or compat.current_engine()
    for name, settings in cfg.engine_settings.items():
        if name not in compat.ENGINES:
            raise ConfigError(f"{where}: engine_settings.{name}: not an engine ({'|'.join(compat.ENGINES)})")
        for stage in ("stage1", "stage2"):
            _merge(copy.deepcopy(getattr(cfg, stage).train), settings, where, f"engine_settings.{name}.", True)
            if name == engine:
                _merge(getattr(cfg, stage).train, settings, where, f"engine_settings.{name}.", True)


def given_keys(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, tuple[int, str]]:
    """Where each setting a user gave came from: dotted key -> (rank, source), rank 1 for the config file
    (its path) and 2 for `--set` (which load_config applies last); keys absent are the dataclass defaults
    (rank 0). For settings that stand in for one another (study.max_steps, stage2.train.max_steps), so
    the one the user actually gave wins. Call after load_config has validated the same arguments."""
    out: dict[str, tuple[int, str]] = {}

    def walk(data, prefix, source):
        for key, value in data.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.", source)
            else:
                out[prefix + str(key)] = (1, source)

    if path is not None:
        p = resolve_path(path)
        walk(yaml.safe_load(p.read_text(encoding="utf-8")) or {}, "", str(p))
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        out[key] = (2, f"--set {key}")
    return out


def dump_config(cfg: Config, path: Path):
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

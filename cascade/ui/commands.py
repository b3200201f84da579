"""From the UI's fields to the CLI's arguments, and the CLI's cheap checks run on them first, so a
mistake is shown as the CLI's one-line message beside the field at fault before any job starts."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from stages.errors import InputError

PRESETS = ("toy", "tiny", "if-m", "if-l", "if-xl")
_NOISE_AUG = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*)?$")


@dataclass
class Subject:
    folder: str
    class_noun: str
    preset: str = "toy"
    identifier: str = ""  # empty: the CLI picks a rare token


@dataclass
class TrainSettings:
    stages: tuple[int, ...] = (1,)
    # None or blank: the preset's value; numbers may be given as the text typed
    max_steps: int | str | None = None
    learning_rate: float | str | None = None
    prior_preservation: bool | None = None
    prior_weight: float | str | None = None
    lora_rank: int | str | None = None
    noise_aug: str = ""  # stage II MIN[:MAX]
    sample_noise_level: int | str | None = None  # stage II
    extra: list[str] = field(default_factory=list)  # further --set KEY=VALUE


def extra_lines(text: str) -> list[str]:
    """`--set` overrides typed one per line (blank lines and # comments skipped)."""
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _num(v):
    """A field's value: None when blank; numbers typed into a text field stay text until checked."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    return v.strip() if isinstance(v, str) else v


def _real(v) -> str | None:
    """A number typed as text, as YAML reads it (1e-4 would stay a string); other text is kept, so the
    config's own message names it."""
    v = _num(v)
    if v is None:
        return None
    try:
        return repr(float(v))
    except ValueError:
        return str(v)


def _int(v, flag: str) -> int | None:
    """An integer flag as argparse reads it (its message when it is not one)."""
    v = _num(v)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise InputError(f"argument {flag}: invalid int value: {v!r}") from None


def _opt(flag: str, value) -> list[str]:
    """A flag with a typed value as one argument, `--flag=VALUE`: argparse reads a separate value
    that starts with '-' ("-sks", "-a photo of ...") as another flag."""
    return [f"{flag}={value}"]


def train_argv(subject: Subject, s: TrainSettings, stage: int, output: Path) -> list[str]:
    argv = ["train", f"stage{stage}", *_opt("--config", subject.preset), *_opt("--subject", subject.folder),
            *_opt("--class-noun", subject.class_noun), *_opt("--output", output)]
    if subject.identifier.strip():
        argv += _opt("--identifier", subject.identifier.strip())
    if _num(s.max_steps) is not None:
        argv += _opt("--max-steps", _int(s.max_steps, "--max-steps"))
    if _num(s.lora_rank) is not None:
        argv += _opt("--lora-rank", _int(s.lora_rank, "--lora-rank"))
    if stage == 2 and s.noise_aug.strip():
        argv += _opt("--noise-aug", s.noise_aug.strip())
    if stage == 2 and _num(s.sample_noise_level) is not None:
        argv += _opt("--sample-noise-level", _int(s.sample_noise_level, "--sample-noise-level"))
    for o in _overrides(s, stage):
        argv += _opt("--set", o)
    return argv


def _overrides(s: TrainSettings, stage: int) -> list[str]:
    k = f"stage{stage}.train."
    out = []
    if _num(s.learning_rate) is not None:
        out.append(f"{k}learning_rate={_real(s.learning_rate)}")
    if s.prior_preservation is not None:
        out.append(f"{k}prior_preservation={'true' if s.prior_preservation else 'false'}")
    if _num(s.prior_weight) is not None:
        out.append(f"{k}prior_weight={_real(s.prior_weight)}")
    return out + list(s.extra)


def _flags(subject: Subject, s: TrainSettings, stage: int) -> list[tuple[str, str, object]]:
    """The typed flags as the CLI hands them to load_config (so its messages name the same flags)."""
    k = f"stage{stage}"
    out = []
    if subject.identifier.strip():
        out.append(("--identifier", "identifier.token", subject.identifier.strip()))
    if _num(s.max_steps) is not None:
        out.append(("--max-steps", f"{k}.train.max_steps", _int(s.max_steps, "--max-steps")))
    if _num(s.lora_rank) is not None:
        out.append(("--lora-rank", f"{k}.train.lora_rank", _int(s.lora_rank, "--lora-rank")))
    if stage == 2 and s.noise_aug.strip():
        m = _NOISE_AUG.match(s.noise_aug)
        if not m:
            from cascade.config import ConfigError

            raise ConfigError(f"--noise-aug {s.noise_aug!r}: expected MIN or MIN:MAX, integers in 0..999 (e.g. 0:20)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        out += [("--noise-aug", f"{k}.train.noise_aug_min", lo), ("--noise-aug", f"{k}.train.noise_aug_max", hi)]
    if stage == 2 and _num(s.sample_noise_level) is not None:
        out.append(("--sample-noise-level", f"{k}.sample.noise_level",
                    _int(s.sample_noise_level, "--sample-noise-level")))
    return out


def field_of(e: Exception) -> str:
    """Which field a CLI error is about: subject photos, class noun, identifier, preset or settings."""
    from cascade.config import ConfigError
    from cascade.identifier import IdentifierError
    from stages.data import ImageInputError

    msg = str(e)
    if isinstance(e, IdentifierError) or msg.startswith("--identifier"):
        return "identifier"
    if "--class-noun" in msg:  # before photos: its message speaks of "the subject's class"
        return "class_noun"
    if isinstance(e, ImageInputError) or "subject" in msg.split(":")[0]:
        return "photos"
    if isinstance(e, ConfigError) and ("config file" in msg or msg.startswith("--config")):
        return "preset"
    return "settings"


def check_train(subject: Subject, s: TrainSettings) -> dict[str, str]:
    """The CLI's checks before any model loads, per stage to train: {field: "cascade train stageN: error: ..."}
    (N: the first stage the job trains, whose command meets the error first)."""
    from cascade import model_checks, models, resolutions
    from cascade.config import load_config
    from cascade.identifier import check_identifier
    from stages import components, data, setup

    errors: dict[str, str] = {}

    def note(e: Exception):
        errors.setdefault(field_of(e), f"cascade train stage{(s.stages or (1,))[0]}: error: {e}")

    if not subject.class_noun.strip():
        note(InputError("--class-noun must name the subject's class, e.g. dog"))
    elif subject.identifier.strip():
        try:
            check_identifier(subject.identifier, subject.class_noun)
        except InputError as e:
            note(e)
    if not s.stages:
        errors["settings"] = "choose stage I, stage II or both"
    try:  # the preset alone first: whatever it gets wrong is the preset field's
        load_config(subject.preset)
    except InputError as e:
        errors["preset"] = f"cascade train stage{(s.stages or (1,))[0]}: error: {e}"
        return errors
    for stage in s.stages:
        try:
            cfg = load_config(subject.preset, _overrides(s, stage), _flags(subject, s, stage))
            tc = (cfg.stage1 if stage == 1 else cfg.stage2).train
            setup.early_checks(tc)
            paths = models.resolve(cfg)
            path = paths.stage1 if stage == 1 else paths.stage2
            model_checks.check_trainable(path, stage)
            model_checks.check_models(paths, cfg.models.variant, (stage,))
            components.check_stage(path, stage, f"models.stage{stage} ({path})")
            size = resolutions.stage1_size(path) if stage == 1 else resolutions.stage2_sizes(path, paths.stage1)[0]
            data.load_folder(subject.folder, size, "subject", allow_upscale=tc.allow_upscale)
        except (InputError, FileNotFoundError) as e:
            note(e)
    return errors


def sample_argv(preset: str, prompt: str, num_images: int, seed: int, stage1: str | None, stage2: str | None,
                stage3: str | None, guidance: float | None, noise_level: int | None, output: Path,
                extra: list[str] = ()) -> list[str]:
    argv = ["sample", *_opt("--config", preset), *_opt("--prompt", prompt), *_opt("--num-images", int(num_images)),
            *_opt("--seed", int(seed)), *_opt("--output", output)]
    for flag, v in (("--stage1", stage1), ("--stage2", stage2), ("--stage3", stage3)):
        if v:
            argv += _opt(flag, v)
    if _num(guidance) is not None:
        argv += [*_opt("--set", f"stage1.sample.guidance_scale={_real(guidance)}"),
                 *_opt("--set", f"stage2.sample.guidance_scale={_real(guidance)}")]
    if noise_level is not None:
        argv += _opt("--set", f"stage2.sample.noise_level={int(noise_level)}")
    for o in extra:
        argv += _opt("--set", o)
    return argv


def study_argv(subject: Subject, exports: list[str], train_variants: str, max_steps: int | None,
               levels: str, output: Path, dino: str = "none", extra: list[str] = ()) -> list[str]:
    """`cascade study-sr`: the base SR model always (the study's reference), fine-tuned exports,
    and variants it trains itself ("low=0:0, high=0:250")."""
    argv = ["study-sr", *_opt("--config", subject.preset), *_opt("--subject", subject.folder),
            *_opt("--class-noun", subject.class_noun), *_opt("--output", output),
            *_opt("--noise-levels", levels.replace(" ", ""))]
    if subject.identifier.strip():
        argv += _opt("--identifier", subject.identifier.strip())
    for e in exports:
        argv += _opt("--sr", e)
    variants = [v.strip() for v in re.split(r"[,\s]+", train_variants or "") if v.strip()]
    if variants:
        argv += ["--train"] + [a for v in variants for a in _opt("--variant", v)]
        if _num(max_steps) is not None:
            argv += _opt("--max-steps", _int(max_steps, "--max-steps"))
    argv += _opt("--dino", dino or "none")
    for o in extra:
        argv += _opt("--set", o)
    return argv

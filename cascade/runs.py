"""Run folders: numbered (runs/00012-stage1-dog/) or user-named, never overwritten silently,
each holding its resolved config and a log file."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from cascade.config import Config, dump_config
from stages.errors import InputError

RUNS_DIR = Path("runs")


class OutputExistsError(InputError, FileExistsError):
    pass


def next_run_dir(root: Path, tag: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^(\d{5})-", p.name))]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tag).strip("-")
    return root / f"{max(numbers, default=-1) + 1:05d}-{slug}"


def prepare_output(output: str | None, tag: str, resume: bool = False, overwrite: bool = False) -> Path:
    """The run folder: `output` if given, else the next numbered folder under runs/. An existing
    non-empty folder is an error unless resuming (kept) or overwriting (emptied)."""
    if output is None:
        if resume:
            raise InputError("--resume needs --output naming the run folder to resume")
        path = next_run_dir(RUNS_DIR, tag)
    else:
        path = Path(output)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if resume:
            return path
        if not overwrite:
            raise OutputExistsError(f"output folder {path} exists; pass --resume to continue it or "
                                    f"--overwrite to replace it")
        shutil.rmtree(path)
    elif resume:
        logging.getLogger(__name__).warning("--resume: %s has no run yet; starting fresh", path)
    path.mkdir(parents=True, exist_ok=True)
    return path


LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


def console_logging():
    """INFO to the console once per process; library chatter at WARNING."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not any(getattr(h, "_cascade_console", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(LOG_FORMAT)
        h._cascade_console = True
        root.addHandler(h)
    for noisy in ("httpx", "urllib3", "filelock", "accelerate", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices at import


def start_logging(run_dir: Path, cfg: Config | None = None, is_main: bool = True):
    """Log to the console and (main process) to run_dir/log.txt; write the resolved config next to it."""
    console_logging()
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_cascade_file", False)]:
        root.removeHandler(h)
        h.close()
    if is_main:
        h = logging.FileHandler(run_dir / "log.txt")
        h.setFormatter(LOG_FORMAT)
        h._cascade_file = True
        root.addHandler(h)
        if cfg is not None:
            dump_config(cfg, run_dir / "config.yaml")

"""Run folders: numbered (runs/00012-stage1-dog/) or user-named, never overwritten silently,
each holding its resolved config and a log file."""
from __future__ import annotations

import logging
import re
import shutil
import sys
import time
from pathlib import Path

from cascade.runs import markers
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


def prepare_on_main(state, make) -> Path:
    """The output folder `make()` prepares on the main process only, handed to every process; the
    InputError it raises stops every process instead of leaving the others waiting."""
    result = None
    if state.is_main_process:
        try:
            result = str(make())
        except InputError as e:
            result = e
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder = [result]
        broadcast_object_list(holder)
        result = holder[0]
    if isinstance(result, Exception):
        raise result
    return Path(result)


def prepare_output(output: str | None, tag: str, resume: bool = False, overwrite: bool = False,
                   identity: dict | None = None, protected: dict | None = None) -> Path:
    """The run folder: `output` if given, else the next numbered folder under runs/, marked as a run
    folder and locked for this process (see cascade.run_folder). An existing non-empty folder is an
    error unless it is a cascade run folder and we resume it (the run must match `identity`) or
    overwrite it (emptied). `protected` ({what: path}) names input folders the output must not hold."""
    identity = identity or {"command": tag}
    resumable = "run" in identity
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other: --resume continues the run in --output, "
                         "--overwrite replaces it")
    if output is None:
        if resume:
            raise InputError("--resume needs --output naming the run folder to resume")
        try:
            path = next_run_dir(RUNS_DIR, tag)
        except OSError as e:
            raise InputError(f"cannot create {RUNS_DIR.resolve()}: {e.strerror or e}") from None
    else:
        path = Path(output)
    _check_protected(path, protected or {}, overwrite)
    if path.exists() and not path.is_dir():
        raise InputError(f"--output {path} is a file, not a folder")
    try:
        if path.is_dir() and any(path.iterdir()):
            return _reuse(path, identity, resume, overwrite, resumable)
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        markers.track(path, created)
        if resume:
            logging.getLogger(__name__).warning("--resume: %s has no run yet; starting fresh", path)
        markers.acquire(path)
        markers.write_marker(path, {**identity, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    except OSError as e:
        raise InputError(f"cannot write to output folder {path}: {e.strerror or e}") from None
    return path


def _check_protected(path: Path, protected: dict, overwrite: bool):
    for what, folder in protected.items():
        if folder is None:
            continue
        same = markers.inside(path, folder) and markers.inside(folder, path)
        if same or (markers.inside(folder, path) and (overwrite or what == "subject")):
            raise InputError(f"--output {path} {'is' if same else 'contains'} the {what} folder {folder}; "
                             f"choose an output folder outside it")


def _reuse(path: Path, identity: dict, resume: bool, overwrite: bool, resumable: bool) -> Path:
    if not markers.is_run_folder(path):
        what = "nothing to resume there; " if resume else ""
        raise OutputExistsError(f"output folder {path} exists and is not a cascade run folder (no "
                                f"{markers.MARKER}); {what}choose a new --output (cascade only replaces "
                                f"folders it created)")
    if not (resume and resumable) and not overwrite:
        hint = "pass --resume to continue it or --overwrite to replace it" if resumable else \
            "pass --overwrite to replace it"
        raise OutputExistsError(f"output folder {path} exists (a cascade run folder); {hint}")
    markers.acquire(path)
    if resume:
        markers.check_resume(path, identity)
        markers.write_marker(path, {**markers.read_marker(path), **identity})
        return path
    for child in path.iterdir():
        if child.name == markers.LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    markers.track(path, created=False)
    markers.write_marker(path, {**identity, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return path


LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is now, not as it was when the handler was made (in-process callers
    such as tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def format(self, record) -> str:  # a non-UTF-8 file name (surrogate escapes) prints escaped, never raises
        enc = getattr(sys.stderr, "encoding", None) or "utf-8"
        return super().format(record).encode(enc, "backslashreplace").decode(enc)


def console_logging():
    """INFO to the console once per process; library chatter at WARNING."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not any(getattr(h, "_cascade_console", False) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(LOG_FORMAT)
        h._cascade_console = True
        root.addHandler(h)
    for noisy in ("httpx", "urllib3", "filelock", "accelerate", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notices at import
    from cascade import quiet

    quiet.no_cuda_for_deepspeed()  # DeepSpeed's "Setting accelerator to CPU" notice (cascade.quiet)


def start_logging(run_dir: Path, cfg: Config | None = None, is_main: bool = True):
    """Log to the console and (main process) to run_dir/log.txt; write the resolved config next to it."""
    console_logging()
    stop_file_logging()
    root = logging.getLogger()
    if is_main:
        h = logging.FileHandler(run_dir / "log.txt", encoding="utf-8", errors="backslashreplace")  # odd file names
        h.setFormatter(LOG_FORMAT)
        h._cascade_file = True
        root.addHandler(h)
        if cfg is not None:
            dump_config(cfg, run_dir / "config.yaml")


def stop_file_logging():
    """Close the run folder's log.txt (at the end of a command, so nothing else lands in it)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_cascade_file", False)]:
        root.removeHandler(h)
        h.close()

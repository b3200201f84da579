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


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def safe_name(name: str, what: str) -> str:
    """A user-given name that becomes a folder: plain letters, digits, . _ - (no path, no dotfile)."""
    if not _SAFE_NAME.match(name or "") or ".." in name:
        raise InputError(f"{what} {name!r}: a name becomes a folder, so it must be 1-64 letters, digits, '.', '_' "
                         f"or '-', starting with a letter or digit (no '/', no '..')")
    return name


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
    folder and locked for this process (see cascade.runs.markers). An existing non-empty folder is an
    error unless it is a cascade run folder and we resume it (the run must match `identity`) or
    overwrite it (a run of the same command: what that run wrote is deleted, anything else is kept).
    `protected` ({what: path}) names every input of the command (models, exports, photos, class
    folder, prompts file): the output may never be one, nor hold one it would delete."""
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
        markers.begin_run(path, {**identity, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    except OutputExistsError:
        raise  # an OSError too, but already the one line to show
    except OSError as e:
        raise InputError(f"cannot write to output folder {path}: {e.strerror or e}") from None
    return path


def _check_protected(path: Path, protected: dict, overwrite: bool):
    """The output is none of the inputs, and holds none when it would be replaced (the subject never)."""
    for what, given in protected.items():
        if given is None or str(given) in ("", "none") or not Path(given).exists():
            continue  # not a local path (a hub id, stage none): nothing of it can be deleted here
        folder = Path(given)
        same = markers.inside(path, folder) and markers.inside(folder, path)
        if same or (markers.inside(folder, path) and (overwrite or what == "subject")):
            kind = "" if what.endswith(("file", "folder")) else " folder" if folder.is_dir() else " file"
            raise InputError(f"--output {path} {'is' if same else 'contains'} the {what}{kind} {folder}"
                             f"{' (an input of this command)' if what not in ('subject', 'class') else ''}; "
                             f"choose an output folder outside it")
        if overwrite or what == "subject":
            _check_links(path, what, folder)


def _check_links(path: Path, what: str, folder: Path):
    """No file of an input is a symlink into the output: deleting the run's entries would delete the
    input's content (the folder path alone says nothing about where its files point)."""
    import os

    entries = [folder] if not folder.is_dir() else \
        [Path(d) / n for d, dirs, files in os.walk(folder) for n in dirs + files]  # symlinked dirs not entered
    for entry in entries:
        if entry.is_symlink() and markers.inside(entry, path):
            raise InputError(f"--output {path} holds {entry.resolve()}, which {entry} of the {what} links to; "
                             f"the run's files there would replace it: choose an output folder outside it")


def model_inputs(paths, *stages: str) -> dict:
    """{what: path} of a command's models (a ModelPaths), for `protected`."""
    names = {"stage1": "stage I model", "stage2": "stage II model", "stage3": "stage III model",
             "text_encoder": "text encoder"}
    return {names[s]: getattr(paths, s, None) for s in stages or names}


def _reuse(path: Path, identity: dict, resume: bool, overwrite: bool, resumable: bool) -> Path:
    if not markers.is_run_folder(path):
        what = "nothing to resume there; " if resume else ""
        why = f"its {markers.MARKER} is not a cascade record" if (path / markers.MARKER).exists() else \
            f"no {markers.MARKER}"
        raise OutputExistsError(f"output folder {path} exists and is not a cascade run folder ({why}); "
                                f"{what}choose a new --output (cascade only replaces folders it created)")
    if not (resume and resumable) and not overwrite:
        hint = "pass --resume to continue it or --overwrite to replace it" if resumable else \
            "pass --overwrite to replace it"
        raise OutputExistsError(f"output folder {path} exists (a cascade run folder); {hint}")
    rec = markers.read_marker(path)
    ours = markers.written_by_run(path)
    if overwrite and rec["command"] != identity["command"]:
        shown = ", ".join(sorted(n + ("/" if (path / n).is_dir() else "") for n in ours)[:6]) or "no files"
        raise OutputExistsError(f"output folder {path} holds a cascade {rec['command']!r} run ({shown}); "
                                f"--overwrite replaces only a {identity['command']!r} run: choose another "
                                f"--output (or delete that folder yourself)")
    markers.acquire(path)
    if resume:
        markers.check_resume(path, identity)
        markers.begin_run(path, {**rec, **identity})
        return path
    for name in ours:
        child = path / name
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    kept = sorted(markers.entries(path))
    if kept:
        logging.getLogger(__name__).warning(
            "--overwrite: %s: kept %d entr%s that the run did not write: %s", path, len(kept),
            "y" if len(kept) == 1 else "ies", ", ".join(kept[:8]) + (" ..." if len(kept) > 8 else ""))
    markers.track(path, created=False)
    markers.begin_run(path, {**identity, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
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

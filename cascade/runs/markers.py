"""What makes a folder a cascade run folder, and the guarantees around it.

- A run folder carries a marker file (`.cascade-run`, a JSON object: which command made it and, for
  a training run, what it trains on); a marker that is not such a record does not make a run folder.
  `--overwrite` replaces only a run folder of the same command, never one that is or contains an
  input of the command, and deletes only what the run wrote: the marker lists the entries that were
  not the run's (`kept`) and, once a command ends, the ones it wrote (`wrote`); anything else a user
  put there since is kept and named.
- `--resume` continues only a run that matches: same stage, subject (its path and the sha256 of its
  files: photos replaced at the same path are another run), class, model, identifier and training
  settings (a larger `max_steps` and bookkeeping settings may change).
- One writer at a time: the main process holds `.cascade-lock` (pid, host, process start time)
  until it exits; a lock whose process is gone on this host is stale and taken over by one process
  only (a takeover file made with O_EXCL, named after the stale lock's content, guards its removal).
- A command that fails before writing results removes the folder it created (never one it did not).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from stages.errors import InputError
from stages.photos import CLASS_MANIFEST

log = logging.getLogger(__name__)

MARKER = ".cascade-run"
LOCK = ".cascade-lock"
BOOKKEEPING = {MARKER, LOCK, "config.yaml", "log.txt", CLASS_MANIFEST}  # files that are not results
# training settings that may change on --resume: they do not change the weights a step produces
RESUME_FREE = {"checkpoint_every", "keep_checkpoints", "sample_every", "validation_images", "validation_steps",
               "report_to", "gradient_checkpointing", "attention"}


class RunLockedError(InputError):
    """Another live process writes into this run folder."""


def valid_marker(rec) -> bool:
    """A marker cascade wrote: a JSON object naming the command (a garbage file is not one)."""
    return isinstance(rec, dict) and isinstance(rec.get("command"), str) and bool(rec["command"].strip()) and \
        all(isinstance(rec.get(k, []), list) for k in ("kept", "wrote"))


def is_run_folder(path: Path) -> bool:
    return (path / MARKER).is_file() and valid_marker(read_marker(path))


def read_marker(path: Path) -> dict:
    try:
        if (path / MARKER).stat().st_size > 1 << 22:  # no marker of ours is that large
            return {}
        rec = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def write_marker(path: Path, record: dict):
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path / MARKER)


def inside(child: Path, parent: Path) -> bool:
    """child is parent or lies somewhere below it (symlinks resolved)."""
    c, p = Path(child).resolve(), Path(parent).resolve()
    return c == p or p in c.parents


# ---------------------------------------------------------------- the lock
def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), so a reused PID is not mistaken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _proc_start(pid)
    return holder.get("start") is None or start is None or start == holder["start"]


_held: set[Path] = set()


def acquire(folder: Path):
    """Take the folder's lock or raise RunLockedError naming the holder; stale locks are taken over,
    by one process only (`_take_over`), and the lock is ours only once it reads back as ours."""
    lock = folder / LOCK
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
                     "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(40):
        if _create(lock, me):
            if _read(lock) == me:
                _held.add(folder)
                return
            continue
        raw = _read(lock)
        if raw is None:
            continue  # released or taken over just now: try again
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        if not holder and time.time() - _mtime(lock) < 10:
            time.sleep(0.5)  # a lock of an older cascade being written right now
            continue
        mine = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
        if holder and not mine and (holder.get("host") != socket.gethostname() or _alive(holder)):
            raise RunLockedError(
                f"run folder {folder} is in use by process {holder.get('pid')} on {holder.get('host')} "
                f"(since {holder.get('since')}); wait for it to finish or choose another --output "
                f"(if that process is gone, delete {lock})")
        if not mine:
            log.warning("%s: taking over a stale lock of process %s on %s", folder, holder.get("pid"),
                        holder.get("host"))
        if not _take_over(lock, raw):
            time.sleep(0.05)  # another process is taking it over: look again
    raise RunLockedError(f"run folder {folder}: could not take its lock {lock} (if no cascade command runs there, "
                         f"delete {lock} and any {LOCK}.takeover-* beside it)")


def _read(lock: Path) -> str | None:
    try:
        return lock.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _create(lock: Path, content: str) -> bool:
    """Create the lock with its whole content at once (a hard link of a written temp file), or False
    when it exists; never an empty lock that another process could take for a stale one."""
    tmp = lock.with_name(f"{LOCK}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644), "w") as f:
            f.write(content)
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem: create exclusively, then write
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: the error that matters is the one above
            pass


def _take_over(lock: Path, stale: str) -> bool:
    """Remove the stale lock whose content is `stale`, if it still is that lock. Only the process that
    creates the takeover file named after that content may remove it: two processes that both judged
    it stale cannot both remove a lock (the second would remove the lock the first just took).
    False when another process is taking it over."""
    import hashlib

    token = lock.with_name(f"{LOCK}.takeover-{hashlib.sha256(stale.encode()).hexdigest()[:16]}")
    try:
        os.close(os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    try:
        if _read(lock) == stale:
            lock.unlink()
    finally:
        token.unlink(missing_ok=True)
    return True


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def release(folder: Path):
    folder = Path(folder)
    if folder in _held:
        _held.discard(folder)
        try:
            if json.loads((folder / LOCK).read_text()).get("pid") == os.getpid():
                (folder / LOCK).unlink()
        except (OSError, ValueError):
            pass


def release_all():
    for folder in list(_held):
        release(folder)


atexit.register(release_all)

# ---------------------------------------------------------------- folders this command made
_made: list[tuple[Path, bool]] = []  # (folder, created by this command)


def track(folder: Path, created: bool):
    _made.append((Path(folder), created))


def begin():
    _made.clear()
    _runs.clear()


def _has_results(folder: Path) -> bool:
    return any(p.is_file() and p.name not in BOOKKEEPING for p in folder.rglob("*"))


def finish(failed: bool):
    """End of a command: release locks; after a failure, remove what this command made in folders
    that hold no results yet (a folder it created is removed whole; a pre-existing empty folder it
    used gets its bookkeeping files removed)."""
    try:
        record_written()  # while the lock is still held
    except OSError:  # a folder gone read-only: its marker keeps the `kept` list
        _runs.clear()
    release_all()
    if failed:
        for folder, created in reversed(_made):
            if not folder.is_dir() or _has_results(folder):
                continue
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for name in BOOKKEEPING:
                    try:
                        (folder / name).unlink(missing_ok=True)
                    except OSError:  # e.g. a read-only mount: nothing of ours could be written there
                        pass
    _made.clear()


# ---------------------------------------------------------------- what a run wrote
_runs: list[Path] = []  # run folders prepared by this command: their `wrote` list is recorded at its end


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(LOCK)} - {MARKER, MARKER + ".tmp"}  # lock + its temp files


def written_by_run(folder: Path) -> set[str]:
    """The top-level entries of a run folder that its runs wrote: the `wrote` list of a command that
    ended; for one that never ended (killed), everything but what was there before it (`kept`)."""
    rec, now = read_marker(folder), entries(folder)
    if rec.get("finished") and "wrote" in rec:
        return now & set(rec["wrote"])
    return now - set(rec.get("kept", []))


def begin_run(folder: Path, record: dict):
    """Write the marker of a run starting in `folder`: what is there now and not the run's is `kept`."""
    kept = sorted(entries(folder) - (written_by_run(folder) if is_run_folder(folder) else set()))
    write_marker(folder, {**record, "kept": kept, "finished": False})
    _runs.append(Path(folder))


def record_written():
    """End of a command: each run folder's marker lists what its runs wrote."""
    for folder in _runs:
        rec = read_marker(folder)
        if folder.is_dir() and valid_marker(rec):
            write_marker(folder, {**rec, "wrote": sorted(entries(folder) - set(rec.get("kept", []))),
                                  "finished": True})
    _runs.clear()


# ---------------------------------------------------------------- --resume
def folder_digest(folder) -> str | None:
    """sha256 over the names and bytes of a folder's regular files (not subfolders, not dotfiles): the
    photos and their caption files, so `--resume` knows when the photos at the same path changed."""
    import hashlib

    folder = Path(folder)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        h.update(f.name.encode("utf-8", "surrogateescape") + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


CONTENT_KEYS = {"subject_sha256": "subject photos (content)"}  # not in markers of older runs: not compared then


def resume_mismatch(old: dict, new: dict) -> list[str]:
    """Describe what differs between the run recorded in the marker and the one asked for."""
    diffs = []
    for key in ("stage", "subject", "class_noun", "identifier", "model", "text_encoder", "class_dir", "variant",
                "max_text_length", "sample_noise_level"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key.replace('_', ' ')} {old.get(key)!r} -> {new.get(key)!r}")
    for key, what in CONTENT_KEYS.items():
        if key in old and old[key] != new.get(key):
            diffs.append(f"{what} changed since the run started (sha256 {str(old[key])[:12]} -> "
                         f"{str(new.get(key))[:12]})")
    ot, nt = old.get("train", {}), new.get("train", {})
    prefix = f"stage{new.get('stage')}.train."
    for key in sorted(set(ot) | set(nt)):
        if key in RESUME_FREE or ot.get(key) == nt.get(key):
            continue
        if key == "max_steps" and isinstance(ot.get(key), int) and nt.get(key, 0) >= ot[key]:
            continue
        note = " (a resume may only raise max_steps)" if key == "max_steps" else ""
        diffs.append(f"{prefix}{key} {ot.get(key)!r} -> {nt.get(key)!r}{note}")
    return diffs


def check_resume(path: Path, identity: dict):
    rec = read_marker(path)
    if rec.get("command") != identity.get("command"):
        raise InputError(f"--resume: {path} is a cascade {rec.get('command') or 'unknown'} folder, not a "
                         f"{identity.get('command')} run")
    diffs = resume_mismatch(rec.get("run", {}), identity.get("run", {}))
    if diffs:
        raise InputError(f"--resume: {path} is a different run ({'; '.join(diffs)}); resume it with its own "
                         f"settings, or start a new --output")

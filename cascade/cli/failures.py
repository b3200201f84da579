"""Failures that are not bad input but still end in one line and an exit code, never a traceback
(the promises are listed in docs/errors.md):

- Ctrl-C (KeyboardInterrupt): exit 130, and how to continue (`--resume`, or run again);
- disk full (ENOSPC / EDQUOT, also when torch or safetensors wrap it): exit 1, the file, how to continue;
- a text file that is not UTF-8 (config, prompts, captions): exit 2;
- a weights file that torch refuses to unpickle (`weights_only=True`): exit 2;
- any other OSError (a read-only folder, a missing permission): exit 1, its message naming the file.

Everything else propagates, so a real bug still shows its traceback.
"""
from __future__ import annotations

import errno
import pickle
import re
from pathlib import Path

from stages.errors import WRITING

INTERRUPTED = 130  # the shell's code for a command ended by SIGINT
DISK_FULL_TEXT = ("No space left on device", "StorageFull", "os error 28", "Disk quota exceeded")
RESUMABLE = ("train stage1", "train stage2", "toy pretrain")  # commands with --resume
WEIGHT_FILE = re.compile(r"'([^']+\.(?:bin|pt|pth|pkl|ckpt))'")
KEEPS_IMAGES = ("evaluate", "class-images")  # a rerun keeps the images already written


def command_name(args) -> str:
    if args.command == "train":
        return f"train {args.stage}"
    if args.command == "toy":
        return f"toy {args.toy_command}"
    return args.command


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_full(e: BaseException) -> BaseException | None:
    """The exception in e's chain that reports a full disk, if any."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return x
        if isinstance(x, Exception) and any(t in str(x) for t in DISK_FULL_TEXT):
            return x
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split())[:200] if text else e.__class__.__name__


def one_line(e: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for the failures above; None for anything else."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", INTERRUPTED
    full = disk_full(e)
    if full is not None:  # the file the OS names, else the one our writer was writing (stages.errors.writing)
        where = getattr(full, "filename", None) or next(
            (w for x in _chain(e) if (w := getattr(x, WRITING, None))), None)
        return f"disk full (no space left on the device){f' writing {where}' if where else ''}", 1
    chain = list(_chain(e))
    refused = [x for x in chain if isinstance(x, pickle.UnpicklingError)]
    if refused:  # diffusers re-raises it as OSError (via a UnicodeDecodeError): the pickle is the cause
        files = [m.group(1) for x in chain if (m := WEIGHT_FILE.search(str(x)))]
        return (f"{files[0] if files else 'a weights or checkpoint file'} was refused: it holds pickled objects, "
                f"not plain tensors, and cascade never unpickles code ({_first_line(refused[-1])})"), 2
    for x in chain:
        if isinstance(x, UnicodeDecodeError):
            return (f"a text file is not UTF-8 ({x.reason} at byte {x.start}); save it as UTF-8 "
                    f"(`iconv -t UTF-8`)"), 2
    if isinstance(e, OSError):  # e.g. a read-only folder; the message names the file
        return str(e), 1
    return None


def run_folders(args) -> list[Path]:
    """The run folders this command wrote into (before cleanup), the named --output first."""
    from cascade.runs import markers

    found = [Path(args.output)] if getattr(args, "output", None) else []
    return found + [f for f, _ in getattr(markers, "_made", [])]


def hint(e: BaseException, args, folders: list[Path]) -> str:
    """How to go on after an interruption or a full disk."""
    if not isinstance(e, KeyboardInterrupt) and disk_full(e) is None:
        return ""
    first = "free space, then " if disk_full(e) is not None else ""
    name = command_name(args)
    if name in RESUMABLE:
        kept = [f for f in folders if f.is_dir() and any(f.iterdir())]
        if not kept:
            return f"; nothing was saved yet: {first}run the same command again"
        where = "" if getattr(args, "output", None) else f" --output {kept[0]}"
        return f"; {first}resume: the same command with --resume{where}"
    if name in KEEPS_IMAGES:
        return f"; {first}run the same command again: the images already written are kept"
    return f"; {first}run the command again"

"""Log lines from before a run folder exists (image warnings, the identifier) reach its log.txt.

A bounded buffer on the root logger remembers recent records; `mark()` notes where a command
started and `replay_since(mark)` writes what came after it into the file handlers opened since.
"""
from __future__ import annotations

import collections
import itertools
import logging

_KEEP = 500  # records remembered; a command logs far fewer before its folder exists


class _Recent(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: collections.deque = collections.deque(maxlen=_KEEP)
        self.counter = itertools.count(1)
        self.last = 0

    def emit(self, record: logging.LogRecord):
        self.last = next(self.counter)
        self.records.append((self.last, record))


def _recent() -> _Recent:
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h, _Recent):
            return h
    h = _Recent()
    root.addHandler(h)
    return h


def mark() -> int:
    """Start remembering (if not yet) and return the position to replay from."""
    return _recent().last


def replay_since(position: int):
    """Write records logged after `position` into the run's file handler(s)."""
    recent = _recent()
    files = [h for h in logging.getLogger().handlers if getattr(h, "_cascade_file", False)]
    for seq, record in list(recent.records):
        if seq > position:
            for h in files:
                if record.levelno >= h.level:
                    h.handle(record)

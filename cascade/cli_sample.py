"""`cascade sample` and `cascade demo` (filled in by the runner issue)."""
from __future__ import annotations

COMMANDS: dict = {}


def add_commands(sub, common_config):
    return None

"""`cascade ui`: the local web app (needs the ui extra: pip install 'cascade-dreambooth[ui]')."""
from __future__ import annotations

import importlib.util

from stages.errors import InputError


def add_commands(sub):
    p = sub.add_parser("ui", help="a local web app: train a subject, watch it learn, sample, compare SR (needs [ui])")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; any other needs --auth or $CASCADE_UI_AUTH)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--runs", default="runs", help="the runs folder it reads, trains into and serves (default runs)")
    p.add_argument("--config", default="toy", help="the preset the forms start with (default toy: offline, CPU)")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="require this login (or set CASCADE_UI_AUTH=USER:PASS, kept out of the process list)")


def cmd_ui(args):
    from cascade.ui import safety

    auth = safety.resolve_auth(args.host, args.auth)
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:
        raise InputError("cascade ui needs Gradio: pip install 'cascade-dreambooth[ui]'")
    from cascade.ui.app import serve

    if auth:
        print(f"cascade ui: login required (user {auth[0]})")
    serve(args.runs, args.config, args.host, args.port, auth)


COMMANDS = {"ui": cmd_ui}

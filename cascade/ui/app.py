"""The Gradio app: five tabs over one runs folder, launched safe by default (loopback only unless a
login is set, no share link, uploads images-only with a size limit and kept outside the runs
folder, only images, CSV and JSON served, no cross-origin posts)."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cascade.ui import safety
from cascade.ui.jobs import JobQueue
from cascade.ui.runs_view import UI_DIR


@dataclass
class Context:
    """What every tab shares: the runs folder, the default preset and the one job queue."""
    runs: Path
    preset: str
    queue: JobQueue
    reserved: set = field(default_factory=set)  # run folders named for queued jobs, not made yet

    def new_folder(self, tag: str, under: Path | None = None) -> Path:
        """The next numbered folder NNNNN-tag (not created), never one a queued job was given."""
        import re

        root = under or self.runs
        root.mkdir(parents=True, exist_ok=True)
        taken = {p.name for p in root.iterdir()} | {p.name for p in self.reserved if p.parent == root}
        numbers = [int(m.group(1)) for n in taken if (m := re.match(r"^(\d{5})-", n))]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tag).strip("-")
        path = root / f"{max(numbers, default=-1) + 1:05d}-{slug}"
        self.reserved.add(path)
        return path


def prepare_environment(runs: Path) -> Path:
    """Gradio's upload cache in a private temporary folder outside the runs folder (the runs folder
    is served; an upload must never be: guard.py serves only images from the cache), removed at
    exit; no usage reporting; no static-file worker processes (they would bypass the guard). Must
    run before gradio is imported."""
    cache = Path(tempfile.mkdtemp(prefix="cascade-ui-uploads-"))  # mode 0700
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.pop("GRADIO_NUM_WORKERS", None)
    return cache


def job_env() -> dict:
    """The subprocesses' environment: this one, with the package importable from wherever it is."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("GRADIO_TEMP_DIR", None)
    return env


def build(ctx: Context):
    import gradio as gr

    from cascade.ui import tab_compare, tab_runs, tab_sample, tab_subject, tab_train

    with gr.Blocks(title="cascade") as app:
        gr.Markdown("# cascade: DreamBooth on the IF cascade\nTrain a subject, watch it learn, sample the "
                    "chain, compare SR settings. Jobs run the `cascade` command in a separate process.")
        with gr.Tabs():
            with gr.Tab("Subject", id="subject"):
                subject = tab_subject.build(ctx)
            with gr.Tab("Train", id="train"):
                tab_train.build(ctx, subject)
            with gr.Tab("Sample", id="sample") as sample_tab:
                tab_sample.build(ctx, subject, sample_tab)
            with gr.Tab("Compare SR", id="compare") as compare_tab:
                tab_compare.build(ctx, subject, compare_tab)
            with gr.Tab("Runs", id="runs") as runs_tab:
                tab_runs.build(ctx, runs_tab)
    return app


def serve(runs: str | Path, preset: str, host: str, port: int | None, auth: tuple[str, str] | None,
          block: bool = True):
    runs = Path(runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)  # the jobs' working folder
    prepare_environment(runs)
    if block and threading.current_thread() is threading.main_thread():  # SIGTERM ends it as Ctrl-C does:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the exit handlers remove the upload cache
    import gradio as gr
    from starlette.middleware import Middleware

    from cascade.ui.guard import Guard

    ctx = Context(runs, preset, JobQueue(runs, job_env()))
    app = build(ctx)
    app.queue(default_concurrency_limit=1)
    where = "this machine only" if host in safety.LOCAL_HOSTS else "the network (login required)"
    print(f"cascade ui: serving {runs} on http://{host}:{port or 7860} ({where}); no share link", file=sys.stderr)
    # the guard (guard.py) sits in front of every route: files by type, no cross-origin posts, without
    # a login loopback Host names only; the runs folder's old upload cache (before uploads moved out
    # of it) is never served
    app.launch(server_name=host, server_port=port, auth=auth, share=False, allowed_paths=[str(runs)],
               blocked_paths=[str(runs / UI_DIR / "gradio")], max_file_size=f"{safety.MAX_UPLOAD_MB}mb",
               prevent_thread_lock=not block, quiet=True, inbrowser=False, theme=gr.themes.Default(),
               ssr_mode=False, app_kwargs={"middleware": [Middleware(Guard, runs=runs, local_hosts=None if auth else safety.LOCAL_HOSTS)]})
    return app, ctx

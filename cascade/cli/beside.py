"""Jobs run in a spawned process beside the command's own work (`cascade demo`: the base cascade's
samples and the high-augmentation stage II fine-tune, which need no fine-tuned model)."""
from __future__ import annotations

import logging
import time

from stages.errors import InputError

log = logging.getLogger(__name__)


class Beside:
    """Jobs (picklable callables, by name) run one after another in a spawned process beside the demo's
    trainings; the cores are shared: the child gets one torch thread and the demo one fewer, until the
    child is done. Its trainings log to their run folders' log.txt. With one core they run first, here."""

    def __init__(self, jobs: dict):
        import multiprocessing

        import torch

        self.threads, self.seconds, self.proc = torch.get_num_threads(), {}, None
        # how the report labels the jobs' timings: they ran beside the trainings only with a spare core
        self.where = "beside the trainings" if self.threads >= 2 else "before the trainings, in turn: one core"
        if self.threads < 2:
            self.results = _run_jobs(jobs, self.seconds)
            return
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        self.pipe, child_end = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_jobs_in_child, args=(jobs, child_end), daemon=True)
        self.proc.start()
        child_end.close()
        torch.set_num_threads(self.threads - 1)

    def join(self) -> list:
        """The jobs' results in order; InputError naming the failed job when one failed."""
        if self.proc is None:
            return self.results
        try:
            error, results, self.seconds = self.pipe.recv()
        except EOFError:  # died without a word (killed, out of memory)
            error, results = f"the process stopped with exit code {self.proc.exitcode}", None
        self.proc.join(timeout=60)
        self.stop()
        if error:
            raise InputError(f"demo: a job beside the trainings failed: {error}")
        return results

    def release_cores_if_done(self):
        """Give the demo its threads back as soon as the child has finished."""
        import torch

        if self.proc is not None and self.pipe.poll():
            torch.set_num_threads(self.threads)

    def stop(self):
        """Stop the child if it still runs (the demo failed or was interrupted); restore the threads."""
        import torch

        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()
        torch.set_num_threads(self.threads)


def _run_jobs(jobs: dict, seconds: dict) -> list:
    results = []
    for name, job in jobs.items():
        t = time.time()
        results.append(job())
        seconds[name] = round(time.time() - t, 2)
        log.info("demo: %s took %.1f s", name, seconds[name])
    return results


def _jobs_in_child(jobs: dict, conn):
    import os
    import sys

    import torch

    torch.set_num_threads(1)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # the run folders' logs have everything; the console stays readable
    seconds = {}
    try:
        conn.send((None, _run_jobs(jobs, seconds), seconds))
    except BaseException as e:  # noqa: BLE001 - reported to the demo in one line
        conn.send((f"{list(jobs)[len(seconds)]}: {type(e).__name__}: {e}", None, seconds))

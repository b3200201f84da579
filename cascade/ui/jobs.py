"""Jobs: each a `python -m cascade ...` subprocess (the CLI's own code), watched from its output.

One queue runs one job at a time (training and SR studies); the others wait. A crash or a cancel
ends only the subprocess; a cancelled training run keeps its checkpoints and resumes with
`--resume`, as a killed one does."""
from __future__ import annotations

import collections
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# a tqdm line: "stage 1:  40%|####      | 4/10 [00:02<00:03, 1.9it/s, loss=0.1234]"
_BAR = re.compile(r"^(?P<desc>[^|]*?):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<rest>[^\]]*)\]")
_LOSS = re.compile(r"loss=(?P<loss>[-+0-9.eE]+|nan|inf)")
_ERROR = re.compile(r"^cascade [\w -]+: error: ")
_ids = itertools.count(1)


@dataclass
class Job:
    kind: str  # "train", "sample", "study-sr"
    argv: list[str]  # the arguments after `cascade`
    title: str
    run_dir: Path | None = None
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued, running, done, failed, cancelled
    desc: str = ""  # the current progress bar's name
    n: int = 0
    total: int = 0
    losses: dict = field(default_factory=dict)  # step -> loss, from the training bar
    error: str = ""  # the CLI's one-line error, when it gave one
    returncode: int | None = None
    started: float | None = None
    finished: float | None = None
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    _bar_start: tuple = (0.0, 0)
    _last_loss: str = ""
    _proc: subprocess.Popen | None = None
    _cancel: bool = False

    def command(self) -> list[str]:
        return [sys.executable, "-m", "cascade", *self.argv]

    def eta(self) -> float | None:
        """Seconds left on the current bar, from its rate since it started here."""
        t0, n0 = self._bar_start
        if self.n <= n0 or self.total <= 0 or self.state != "running":
            return None
        rate = (self.n - n0) / max(time.time() - t0, 1e-6)
        return (self.total - self.n) / rate

    def feed(self, line: str):
        """One line (or carriage-return update) of the subprocess's output."""
        line = line.rstrip()
        if not line:
            return
        m = _BAR.match(line.strip())
        if m:
            desc, n, total = m.group("desc").strip(), int(m.group("n")), int(m.group("total"))
            if desc != self.desc or total != self.total or n < self.n:
                self._bar_start = (time.time(), n)
            self.desc, self.n, self.total = desc, n, total
            loss = _LOSS.search(m.group("rest"))
            if loss and self.kind == "train" and desc.startswith("stage") and loss.group("loss") != self._last_loss:
                # the trainer sets a step's loss before the bar counts that step: a new value is step n + 1
                self._last_loss = loss.group("loss")
                self.losses[min(n + 1, total)] = float(loss.group("loss"))
            return
        if _ERROR.match(line):
            self.error = line
        self.lines.append(line)

    def run(self, cwd: Path, env: dict | None = None):
        """Run the subprocess to its end (blocking); never raises for the subprocess's failure."""
        if self._cancel:
            self.state = "cancelled"
            return
        self.state, self.started = "running", time.time()
        try:
            self._proc = subprocess.Popen(self.command(), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            self.error, self.state, self.finished = f"cannot start {self.command()[0]}: {e}", "failed", time.time()
            return
        if self._cancel:  # cancelled while it started
            self.cancel()
        buf = b""
        while chunk := self._proc.stdout.read1(4096):
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
            for p in parts:
                self.feed(p.decode("utf-8", "replace"))
        self.feed(buf.decode("utf-8", "replace"))
        self.returncode = self._proc.wait()
        self.finished = time.time()
        self.state = "cancelled" if self._cancel else ("done" if self.returncode == 0 else "failed")
        if self.state == "failed" and not self.error:
            self.error = next((ln for ln in reversed(self.lines) if "Error" in ln or "error" in ln),
                              f"exit code {self.returncode}")

    def cancel(self, grace: float = 10.0):
        """Stop the job: a queued one never starts; a running one gets SIGTERM, then SIGKILL."""
        self._cancel = True
        proc = self._proc
        if proc is None or proc.poll() is not None:
            if self.state == "queued":
                self.state = "cancelled"
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def resume_argv(self) -> list[str]:
        """The same training command, continuing its run folder from the last checkpoint."""
        argv = [a for a in self.argv if a not in ("--overwrite", "--resume")]
        return argv + ["--resume"]

    def summary(self) -> str:
        if self.state == "running" and self.total:
            eta = self.eta()
            return f"{self.desc} {self.n}/{self.total}" + (f", ETA {_clock(eta)}" if eta is not None else "")
        if self.finished and self.started:
            return f"{self.state} after {_clock(self.finished - self.started)}"
        return self.state


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}"


class JobQueue:
    """Runs submitted jobs one after another in a worker thread."""

    def __init__(self, cwd: Path, env: dict | None = None):
        self.cwd, self.env = Path(cwd), env
        self.jobs: list[Job] = []
        self._lock = threading.Condition()
        self._worker = threading.Thread(target=self._loop, daemon=True, name="cascade-ui-jobs")
        self._worker.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            self.jobs.append(job)
            self._lock.notify()
        return job

    def get(self, job_id: int) -> Job | None:
        return next((j for j in self.jobs if j.id == job_id), None)

    def running(self) -> Job | None:
        return next((j for j in self.jobs if j.state == "running"), None)

    def to_cancel(self, kind: str) -> Job | None:
        """The job a cancel button stops: the running one of that kind, else the newest queued one."""
        jobs = [j for j in self.jobs if j.kind == kind]
        return next((j for j in jobs if j.state == "running"), None) or \
            next((j for j in reversed(jobs) if j.state == "queued"), None)

    def to_resume(self, kind: str) -> Job | None:
        """The job a resume button continues: the newest cancelled or failed one of that kind whose run
        folder no later job has taken up (so a second press reaches the one stopped before it)."""
        jobs = [j for j in self.jobs if j.kind == kind]
        return next((j for i, j in reversed(list(enumerate(jobs))) if j.state in ("cancelled", "failed")
                     and not any(k.run_dir == j.run_dir for k in jobs[i + 1:])), None)

    def resume(self, job: Job) -> Job:
        """Queue `job` again: from its last checkpoint (`--resume`) when it ran, as first given when it
        was cancelled before it started."""
        argv, how = (job.resume_argv(), "resumed") if job.started else (job.argv, "started again")
        return self.submit(Job(job.kind, argv, f"{job.title} ({how})", job.run_dir))

    def pending(self) -> list[Job]:
        return [j for j in self.jobs if j.state in ("queued", "running")]

    def _loop(self):
        while True:
            with self._lock:
                while not (job := next((j for j in self.jobs if j.state == "queued"), None)):
                    self._lock.wait()
            job.run(self.cwd, self.env)  # a job's failure is recorded in it, never raised here

    def wait_idle(self, timeout: float) -> bool:
        end = time.time() + timeout
        while self.pending() and time.time() < end:
            time.sleep(0.1)
        return not self.pending()

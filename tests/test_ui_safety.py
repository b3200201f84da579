"""`cascade ui`'s safety rules and its job queue, without a browser: who may connect, what is served,
what uploads are accepted, user text never becoming HTML, the CLI's checks beside the fields, one
job at a time, a cancelled training run resuming."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from cascade.ui import commands, safety
from cascade.ui.jobs import Job, JobQueue
from stages.errors import InputError


def test_loopback_needs_no_login_anything_else_does():
    assert safety.resolve_auth("127.0.0.1", None, env={}) is None
    assert safety.resolve_auth("localhost", None, env={}) is None
    with pytest.raises(InputError, match="--auth USER:PASS"):
        safety.resolve_auth("0.0.0.0", None, env={})
    assert safety.resolve_auth("0.0.0.0", "ann:s3cret", env={}) == ("ann", "s3cret")
    assert safety.resolve_auth("0.0.0.0", None, env={safety.AUTH_ENV: "bob:pw:with:colons"}) == ("bob", "pw:with:colons")
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(InputError, match="USER:PASS"):
            safety.resolve_auth("0.0.0.0", bad, env={})


def test_ui_command_refuses_an_open_host_in_one_line(capsys, monkeypatch):
    from cascade.cli.main import main

    monkeypatch.delenv(safety.AUTH_ENV, raising=False)
    assert main(["ui", "--host", "0.0.0.0", "--runs", "/nonexistent-never-made"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("cascade ui: error: --host 0.0.0.0: listening beyond this machine")
    assert not Path("/nonexistent-never-made").exists()


def test_served_files_stay_inside_the_runs_folder(tmp_path):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "grid.png").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("no")
    (runs / "out").symlink_to(tmp_path / "secret.txt")
    assert safety.served(runs, "a/grid.png") == (runs / "a" / "grid.png").resolve()
    assert safety.served(runs, str(runs / "a" / "grid.png")) is not None
    for bad in ("../secret.txt", "a/../../secret.txt", str(tmp_path / "secret.txt"), "out", "a", "/etc/passwd"):
        assert safety.served(runs, bad) is None, bad


def test_uploads_accept_images_only_within_the_limit(tmp_path):
    from PIL import Image

    good = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good)
    fake = tmp_path / "evil.png"
    fake.write_text("<script>alert(1)</script>")
    assert safety.check_upload(good) is None
    assert "not an image" in safety.check_upload(fake)
    assert "over the" in safety.check_upload(good, max_mb=good.stat().st_size / 2**20 / 2)


def test_user_text_is_escaped():
    s = safety.text('<script>alert("x")</script> a [V] toy')
    assert "<" not in s and ">" not in s and '"' not in s and "&lt;script&gt;" in s


def test_checks_are_the_clis_own_messages(tmp_path, capsys):
    """The message beside the field is the line `cascade train` prints for the same input."""
    from cascade.cli.main import main
    from cascade.toy.world import subject_photos

    subject = tmp_path / "subject"
    subject.mkdir()
    for i, im in enumerate(subject_photos()):
        im.save(subject / f"{i}.png")
    cases = [("the", str(subject), "identifier"), ("", str(tmp_path / "missing"), "photos")]
    for ident, folder, field in cases:
        errors = commands.check_train(commands.Subject(folder, "toy", "toy", ident), commands.TrainSettings())
        argv = ["train", "stage1", "--config", "toy", "--subject", folder, "--class-noun", "toy",
                "--output", str(tmp_path / "never")] + (["--identifier", ident] if ident else [])
        assert main(argv) == 2
        assert list(errors) == [field] and errors[field] == capsys.readouterr().err.strip()
    assert not (tmp_path / "never").exists()
    bad = commands.check_train(commands.Subject(str(subject), "toy", "toy"),
                               commands.TrainSettings(stages=(2,), noise_aug="5-9", max_steps=0))
    assert set(bad) == {"settings"} and bad["settings"].startswith("cascade train: error: --")
    assert commands.check_train(commands.Subject(str(subject), "toy", "toy"), commands.TrainSettings(stages=(1, 2))) == {}


class FakeJob(Job):
    """A job whose program is a small Python script printing tqdm-style lines (no model)."""

    def __init__(self, script: str, **kw):
        super().__init__("train", [], "fake", **kw)
        self.script = script

    def command(self):
        return [sys.executable, "-c", self.script]


BAR = ("import sys, time\nfor i in range({n}):\n"
       "    sys.stderr.write(f'\\rstage 1:  {{i*10}}%|##   | {{i}}/{n} [00:01<00:02, 1.0it/s, loss={{0.5 / (i + 1):.4f}}]')\n"
       "    sys.stderr.flush(); time.sleep({dt})\n"
       "sys.stderr.write(f'\\rstage 1: 100%|#####| {n}/{n} [00:02<00:00, 1.0it/s, loss={{0.5 / {n}:.4f}}]\\n')\n")


def test_progress_is_read_from_the_commands_bar(tmp_path):
    job = FakeJob(BAR.format(n=4, dt=0.01))
    job.run(tmp_path)
    assert job.state == "done" and (job.n, job.total, job.desc) == (4, 4, "stage 1")
    # the trainer shows step k's loss while the bar still counts k - 1
    assert job.losses == {1: 0.5, 2: 0.25, 3: pytest.approx(0.1667), 4: 0.125}
    err = FakeJob("import sys; print('cascade train: error: --max-steps must be >= 1'); sys.exit(2)")
    err.run(tmp_path)
    assert (err.state, err.returncode, err.error) == ("failed", 2, "cascade train: error: --max-steps must be >= 1")


def test_one_job_at_a_time_and_cancel(tmp_path):
    q = JobQueue(tmp_path)
    mark = tmp_path / "overlap"
    script = ("import time\n"
              f"open({str(mark)!r}, 'a').write('start\\n'); time.sleep({{t}}); open({str(mark)!r}, 'a').write('end\\n')")
    a, b = FakeJob(script.format(t=0.5)), FakeJob(script.format(t=0.1))
    c = FakeJob("import time; time.sleep(60)")
    for j in (a, b, c):
        q.submit(j)
    assert b.state == "queued"
    deadline = time.time() + 30
    while c.state != "running" and time.time() < deadline:
        time.sleep(0.05)
    assert mark.read_text() == "start\nend\nstart\nend\n"  # never two at once
    t = time.time()
    c.cancel(grace=5)
    assert q.wait_idle(10) and c.state == "cancelled" and time.time() - t < 5
    d = FakeJob("print('never')")
    d.cancel()
    q.submit(d)
    assert q.wait_idle(5) and d.state == "cancelled" and d.started is None


def test_cancelled_training_resumes_like_a_killed_run(tmp_path):
    """Cancel the real `cascade train` mid-run, resume it: it continues from the last checkpoint to
    the end, with the loss rows of every step once."""
    from cascade.toy.world import subject_photos
    from cascade.ui.app import job_env
    from cascade.ui.runs_view import losses

    subject = tmp_path / "subject"
    subject.mkdir()
    for i, im in enumerate(subject_photos()):
        im.save(subject / f"{i}.png")
    run = tmp_path / "run"
    s = commands.TrainSettings(max_steps=10, prior_preservation=False,
                               extra=["stage1.train.checkpoint_every=2", "stage1.train.validation_images=0"])
    q = JobQueue(tmp_path, job_env())
    job = q.submit(Job("train", commands.train_argv(commands.Subject(str(subject), "toy", "toy"), s, 1, run),
                       "t", run))
    deadline = time.time() + 240
    while not (run / "checkpoints" / "checkpoint-000004").is_dir() and time.time() < deadline and job.state != "failed":
        time.sleep(0.2)
    job.cancel()
    assert q.wait_idle(30) and job.state == "cancelled", job.lines
    assert not (run / "export").exists()
    done_before = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert 4 <= done_before < 10
    again = q.submit(Job("train", job.resume_argv(), "t (resumed)", run))
    assert q.wait_idle(300) and again.state == "done", list(again.lines)[-5:]
    assert [r[0] for r in losses(run)] == list(range(1, 11))
    assert f"at step {done_before}" in (run / "log.txt").read_text()  # "resumed from ... at step N"
    assert (run / "export" / "cascade.json").is_file()

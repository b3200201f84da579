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
from stages.checkpoint import checkpoints


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
        # the CLI's one error line (third-party notices may precede it on stderr)
        err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
        assert list(errors) == [field] and err_lines == [errors[field]]
    assert not (tmp_path / "never").exists()
    bad = commands.check_train(commands.Subject(str(subject), "toy", "toy"),
                               commands.TrainSettings(stages=(2,), noise_aug="5-9", max_steps=0))
    assert set(bad) == {"settings"} and bad["settings"].startswith("cascade train stage2: error: --")
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
    # a cancel during a save leaves checkpoint-N.tmp; resume (and so the test) counts complete checkpoints
    done_before = checkpoints(run / "checkpoints")[-1][0]
    assert 4 <= done_before < 10
    again = q.submit(Job("train", job.resume_argv(), "t (resumed)", run))
    assert q.wait_idle(300) and again.state == "done", list(again.lines)[-5:]
    assert [r[0] for r in losses(run)] == list(range(1, 11))
    assert f"at step {done_before}" in (run / "log.txt").read_text()  # "resumed from ... at step N"
    assert (run / "export" / "cascade.json").is_file()


def test_the_forms_make_commands_the_cli_parses(tmp_path):
    """What each tab runs is a `cascade` command line its parser reads back field by field."""
    from cascade.cli.main import parse_args

    subj = commands.Subject(str(tmp_path / "photos"), "toy", "toy", "wip")
    s = commands.TrainSettings(stages=(2,), max_steps="7", learning_rate="1e-4", prior_preservation=False,
                               prior_weight="0.5", lora_rank="4", noise_aug="0:20", sample_noise_level="10",
                               extra=commands.extra_lines("stage2.train.sample_every=3\n# note\n"))
    a = parse_args(commands.train_argv(subj, s, 2, tmp_path / "run"))
    assert (a.stage, a.subject, a.class_noun, a.identifier, a.max_steps, a.lora_rank, a.noise_aug,
            a.sample_noise_level, a.output) == ("stage2", subj.folder, "toy", "wip", 7, 4, "0:20", 10, str(tmp_path / "run"))
    assert a.overrides == ["stage2.train.learning_rate=0.0001", "stage2.train.prior_preservation=false",
                           "stage2.train.prior_weight=0.5", "stage2.train.sample_every=3"]
    a = parse_args(commands.sample_argv("toy", "a [V] toy", 2, 3, "E1", None, "none", "4", 50, tmp_path / "s",
                                        ["stage1.sample.steps=5"]))
    assert (a.prompt, a.num_images, a.seed, a.stage1, a.stage2, a.stage3, a.output) == (
        ["a [V] toy"], 2, 3, "E1", None, "none", str(tmp_path / "s"))
    assert a.overrides == ["stage1.sample.guidance_scale=4.0", "stage2.sample.guidance_scale=4.0",
                           "stage2.sample.noise_level=50", "stage1.sample.steps=5"]
    a = parse_args(commands.study_argv(subj, ["X/export"], "low=0:0, high=0:250", "3", "0, 20", tmp_path / "st"))
    assert (a.sr, a.train, a.variant, a.max_steps, a.noise_levels, a.dino, a.identifier) == (
        ["X/export"], True, ["low=0:0", "high=0:250"], 3, "0,20", "none", "wip")
    with pytest.raises(InputError, match="argument --max-steps: invalid int value: 'many'"):
        commands.train_argv(subj, commands.TrainSettings(max_steps="many"), 1, tmp_path / "r")


def test_compare_and_runs_read_folders_generically(tmp_path):
    """A study is any folder with results.csv / table.md; a run any folder with the marker, at any depth;
    the UI's own folder is never listed; text is escaped."""
    pytest.importorskip("pandas", reason="pandas comes with the ui extra (gradio)")
    from cascade.runs.markers import MARKER
    from cascade.ui.runs_view import exports, run_folders, studies
    from cascade.ui.tab_compare import show

    runs = tmp_path / "runs"
    (runs / "00001-study" / "train" / "low" / "export").mkdir(parents=True)
    (runs / "00001-study" / "train" / "low" / MARKER).write_text("{}")
    (runs / "00001-study" / "train" / "low" / "export" / "cascade.json").write_text('{"stage": 2}')
    (runs / "00001-study" / "results.csv").write_text("model,psnr,emblem\nbase,17,0\n")
    (runs / "00001-study" / "table.md").write_text("| <i>x</i> |\n")
    (runs / ".cascade-ui" / "x").mkdir(parents=True)
    (runs / ".cascade-ui" / "x" / MARKER).write_text("{}")
    (runs / ".cascade-ui" / "x" / "results.csv").write_text("a\n1\n")
    assert run_folders(runs) == [runs / "00001-study" / "train" / "low"]
    assert studies(runs) == [runs / "00001-study"]
    assert [(e.stage, e.label) for e in exports(runs)] == [(2, "00001-study/train/low")]
    ctx = type("C", (), {"runs": runs})()
    table, results, grids, plots = show(ctx, "00001-study")
    assert table == "| &lt;i&gt;x&lt;/i&gt; |\n" and list(results.columns) == ["model", "psnr", "emblem"]
    assert show(ctx, "../..")[0] == ""


def test_picked_identifier_is_the_clis(capsys):
    from cascade.cli.main import main
    from cascade.ui.tab_subject import pick_identifier

    for seed in (0, 3):
        assert main(["identifier", "--config", "toy", "--seed", str(seed), "--class-noun", "toy"]) == 0
        assert pick_identifier("toy", "toy", seed) == capsys.readouterr().out.split("\t")[0]

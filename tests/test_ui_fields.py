"""The UI's forms and buttons (issue 27): a preset that is any readable file never has its text
quoted; the check marks each field at fault; values starting with '-' reach the command; a huge
image upload is refused in one line; cancel and resume act on the running, then the stopped job."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from cascade.ui import commands
from cascade.ui.jobs import Job, JobQueue
from tests.helpers.ui_server import png_header

SECRET = "hunter2"
# files a user could name in the preset field: their text must never come back in a message
SECRET_FILES = {
    "bad-yaml.txt": f"password = {SECRET}\nfoo: [\n",
    "quoted.txt": f'password: "{SECRET}\n',
    "tab.txt": f"a: 1\n\tb: {SECRET}\n",
    "alias.yaml": f"x: *{SECRET}\n",
    "value.yaml": f"stage1:\n  train:\n    max_steps: {SECRET}\n",
    "key.yaml": f'"{SECRET} = 1": 2\n',
    "seeds.yaml": f'study: {{seeds: "{SECRET}"}}\n',  # a check (not the loader) that quoted the value
    "variants.yaml": f'study: {{variants: "{SECRET}=a:b x=0:0"}}\n',
}


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    from cascade.toy.world import subject_photos

    folder = tmp_path_factory.mktemp("subject")
    for i, im in enumerate(subject_photos()):
        im.save(folder / f"{i}.png")
    return folder


def test_a_preset_file_is_named_never_quoted(tmp_path, subject, capsys):
    """Through the UI's check and the CLI: one line naming the file (and the line and column of a YAML
    error), none of the file's text."""
    from cascade.cli.main import main
    from cascade.ui.tab_subject import check_subject

    for name, text in SECRET_FILES.items():
        f = tmp_path / name
        f.write_text(text)
        *msgs, verdict = check_subject(str(subject), "toy", str(f), "")
        assert msgs[2] and not msgs[0] + msgs[1] + msgs[3] and verdict == "fix the fields marked above: preset", name
        errors = commands.check_train(commands.Subject(str(subject), "toy", str(f)), commands.TrainSettings())
        line = errors["preset"]
        assert SECRET not in line and "\n" not in line and (f"{f}: " in line or "config 'study." in line), (name, line)
        assert main(["train", "stage1", "--config", str(f), "--subject", str(subject), "--class-noun", "toy",
                     "--output", str(tmp_path / "never")]) == 2
        assert [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln] == [line]
    assert "not valid YAML at line 2, column 4 (mapping values are not allowed here)" in \
        commands.check_train(commands.Subject(str(subject), "toy", str(tmp_path / "bad-yaml.txt")),
                             commands.TrainSettings())["preset"]
    assert not (tmp_path / "never").exists()


def test_check_marks_each_field_at_fault(tmp_path, subject):
    """"fix the fields marked above" names fields that each carry their message."""
    from cascade.ui.tab_subject import check_subject

    steps0 = tmp_path / "steps0.yaml"
    steps0.write_text("stage1:\n  train:\n    max_steps: 0\n")
    cases = [((str(subject), "toy", str(steps0), ""), ["preset"]),
             ((str(tmp_path / "missing"), "toy", "toy", "the"), ["photos", "identifier"]),
             ((str(subject), "", "toy", ""), ["class noun"]),
             ((str(subject), "toy", "toy", ""), [])]
    labels = ["photos", "class noun", "preset", "identifier"]
    for values, fields in cases:
        *msgs, verdict = check_subject(*values)
        assert [lb for lb, m in zip(labels, msgs) if m] == fields, (values, msgs)
        assert verdict == ("fix the fields marked above: " + ", ".join(fields) if fields else
                           "the subject passes the stage I checks")


def test_values_starting_with_a_dash_reach_the_command(tmp_path, subject):
    from cascade.cli.main import parse_args

    subj = commands.Subject("-photos", "-dog", "toy", "-sks")
    s = commands.TrainSettings(stages=(2,), noise_aug="0:20", extra=["-x=1"])
    a = parse_args(commands.train_argv(subj, s, 2, Path("-run")))
    assert (a.subject, a.class_noun, a.identifier, a.noise_aug, a.output, a.overrides) == (
        "-photos", "-dog", "-sks", "0:20", "-run", ["-x=1"])
    a = parse_args(commands.sample_argv("toy", "-a [V] toy", 1, 0, "-E1", None, None, None, None, tmp_path / "s"))
    assert (a.prompt, a.stage1) == (["-a [V] toy"], "-E1")
    a = parse_args(commands.study_argv(subj, ["-X/export"], "-low=0:0", None, "0", tmp_path / "st"))
    assert (a.sr, a.variant, a.identifier, a.class_noun) == (["-X/export"], ["-low=0:0"], "-sks", "-dog")
    # and the CLI's checks take such a value as any other
    assert commands.check_train(commands.Subject(str(subject), "toy", "toy", "-sks"), commands.TrainSettings()) == {}


def test_a_huge_image_upload_is_refused_in_one_line(tmp_path):
    from PIL import Image

    from cascade.ui.app import Context
    from cascade.ui.tab_subject import save_uploads

    good = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "red").save(good)
    bombs = [tmp_path / "huge.png", tmp_path / "big.png"]
    bombs[0].write_bytes(png_header(20000, 20000))  # beyond twice PIL's limit: it raises
    bombs[1].write_bytes(png_header(9000, 9000))  # under PIL's limit (it only warns), over ours
    ctx = Context(tmp_path / "runs", "toy", queue=None)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # no warning escapes either
        folder, refused = save_uploads(ctx, [str(f) for f in (*bombs, good)])
    assert refused == ["huge.png: far over the 64 megapixel limit; scale it down",
                       "big.png: 9000x9000 pixels, over the 64 megapixel limit; scale it down"]
    assert [p.name for p in Path(folder).iterdir()] == ["00.png"]


class ScriptJob(Job):
    """A training job whose program is a short Python script (no model)."""

    def __init__(self, script: str, run_dir: Path):
        super().__init__("train", ["train", "stage1", f"--output={run_dir}"], run_dir.name, run_dir)
        self.script = script

    def command(self):
        return [sys.executable, "-c", self.script]


def _until(cond, timeout: float = 30):
    end = time.time() + timeout
    while not cond() and time.time() < end:
        time.sleep(0.05)
    assert cond()


def test_cancel_and_resume_act_on_the_running_then_the_stopped_job(tmp_path):
    """Stage I running, stage II queued: cancel stops stage I (stage II then runs); resume continues
    stage I, not stage II; a job cancelled before it started is started again as first given."""
    q = JobQueue(tmp_path)
    one = q.submit(ScriptJob("import time; time.sleep(60)", tmp_path / "stage1"))
    two = q.submit(ScriptJob("import time; time.sleep(60)", tmp_path / "stage2"))
    _until(lambda: one.state == "running")
    assert q.to_cancel("train") is one
    one.cancel(grace=5)
    _until(lambda: one.state == "cancelled" and two.state == "running")
    assert q.to_resume("train") is one
    again = q.resume(one)
    assert again.argv == [*one.argv, "--resume"] and again.run_dir == one.run_dir and again.state == "queued"
    assert q.to_resume("train") is None  # stage I is taken up again; stage II still runs
    assert q.to_cancel("train") is two
    again.cancel()
    two.cancel(grace=5)
    assert q.wait_idle(10) and again.started is None
    assert q.to_resume("train") is again
    assert q.resume(again).argv == again.argv  # never started: the command as given, nothing added

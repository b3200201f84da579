"""Run folders (issue 9, items 1-3): --overwrite deletes only cascade run folders and never the
subject or class images, --resume continues only a matching run, one writer per folder."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cascade.runs import markers
from tests.conftest import error_line


@pytest.fixture
def run(train_cli):
    """Training runs without prior preservation, for a dog."""
    return lambda *argv, stage="stage1": train_cli("--class-noun", "dog", "--set",
                                                   f"{stage}.train.prior_preservation=false", *argv, stage=stage)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_and_resume_never_touch_the_subject_photos(run, write_subject, tmp_path):
    photos = write_subject(tmp_path / "photos", 3, 80)
    before = _snapshot(photos)
    for extra, says in ((["--overwrite"], "is the subject folder"), (["--resume"], "is the subject folder"),
                        ([], "is the subject folder")):
        code, err = run("--subject", str(photos), "--output", str(photos), *extra)
        assert code == 2 and says in err, err
    code, err = run("--subject", str(photos), "--output", str(tmp_path), "--overwrite")
    assert code == 2 and "contains the subject folder" in err
    assert _snapshot(photos) == before  # nothing deleted, nothing (loss.png, config.yaml) written into it


def test_overwrite_refuses_a_folder_that_is_not_a_run(run, write_subject, tmp_path):
    photos = write_subject(tmp_path / "photos", 3, 80)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep me")
    code, err = run("--subject", str(photos), "--output", str(mine))
    assert code == 2 and "not a cascade run folder" in err and "--overwrite" not in err.split("error:")[1]
    code, err = run("--subject", str(photos), "--output", str(mine), "--overwrite")
    assert code == 2 and "not a cascade run folder" in err
    code, err = run("--subject", str(photos), "--output", str(mine), "--resume")
    assert code == 2 and "nothing to resume" in err
    assert (mine / "thesis.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]


def test_overwrite_replaces_a_run_folder_but_not_class_images_inside_it(run, write_subject, tmp_path):
    photos = write_subject(tmp_path / "photos", 3, 80)
    out = tmp_path / "run"
    classes = out / "my-classes"
    code, err = run("--subject", str(photos), "--output", str(out), "--class-dir", str(classes),
                    "--set", "stage1.train.prior_preservation=true")
    assert code == 0, err
    assert len(list(classes.glob("class-*.png"))) == 2
    assert json.loads((out / markers.MARKER).read_text())["command"] == "train stage1"
    code, err = run("--subject", str(photos), "--output", str(out))
    assert code == 2 and "--resume" in err and "--overwrite" in err  # a run folder: both are offered
    kept = _snapshot(classes)
    code, err = run("--subject", str(photos), "--output", str(out), "--class-dir", str(classes), "--overwrite")
    assert code == 2 and "contains the class folder" in err and _snapshot(classes) == kept
    (out / "notes.txt").write_text("the user's, put there after the run")
    code, err = run("--subject", str(photos), "--output", str(out), "--overwrite")
    assert code == 0, err
    assert (out / "export" / "cascade.json").is_file()
    assert (out / "notes.txt").is_file() and "kept 1 entry that the run did not write: notes.txt" in err  # issue 17
    assert not (out / markers.LOCK).exists()  # released on exit


def test_resume_refuses_a_different_run_and_allows_more_steps(run, write_subject, tmp_path):
    duck = write_subject(tmp_path / "duck", 3, 256, seed=1)
    dog = write_subject(tmp_path / "dog", 3, 256, seed=2)
    out = tmp_path / "run"
    code, err = run("--subject", str(duck), "--output", str(out), "--set", "stage1.train.max_steps=2")
    assert code == 0, err
    before = _snapshot(out)
    code, err = run("--subject", str(dog), "--output", str(out), "--resume", "--class-noun", "cat",
                    "--set", "stage1.train.max_steps=1", "--set", "stage1.train.learning_rate=1e-3")
    assert code == 2
    err = error_line(err)
    for what in ("subject", "class noun 'dog' -> 'cat'", "stage1.train.max_steps 2 -> 1", "learning_rate"):
        assert what in err, (what, err)
    code, err = run("--subject", str(duck), "--output", str(out), "--resume", stage="stage2")
    assert code == 2 and "not a train stage2 run" in err
    code, err = run("--subject", str(duck), "--output", str(out), "--resume", "--overwrite")
    assert code == 2 and "exclude each other" in err
    assert _snapshot(out) == before  # config.yaml, marker, checkpoints and export untouched
    # a larger max_steps (and bookkeeping settings) may change: training continues from step 2
    code, err = run("--subject", str(duck), "--output", str(out), "--resume", "--set", "stage1.train.max_steps=3",
                    "--set", "stage1.train.checkpoint_every=5")
    assert code == 0, err
    log = (out / "log.txt").read_text()
    assert "at step 2" in log and "stage 1: 1 steps in" in log
    assert json.loads((out / "export" / "cascade.json").read_text())["steps"] == 3
    assert json.loads((out / markers.MARKER).read_text())["run"]["train"]["max_steps"] == 3


def test_a_second_writer_is_refused_and_stale_locks_are_taken_over(run, write_subject, tmp_path):
    photos = write_subject(tmp_path / "photos", 3, 80)
    out = tmp_path / "run"
    out.mkdir()
    markers.write_marker(out, {"command": "train stage1"})
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "weights.bin").write_bytes(b"\1\2\3")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / markers.LOCK).write_text(json.dumps({"pid": other.pid, "host": __import__("socket").gethostname(),
                                                       "start": markers._proc_start(other.pid), "since": "now"}))
        for extra in (["--overwrite"], ["--resume"]):
            code, err = run("--subject", str(photos), "--output", str(out), *extra)
            assert code == 2 and f"in use by process {other.pid}" in error_line(err)
        assert (out / "checkpoints" / "weights.bin").read_bytes() == b"\1\2\3"  # the live writer's files stay
        assert json.loads((out / markers.LOCK).read_text())["pid"] == other.pid  # its lock too
    finally:
        other.kill()
        other.wait()
    # the holder is gone (e.g. kill -9): its lock is stale and taken over, then released on exit
    markers.acquire(out)
    assert json.loads((out / markers.LOCK).read_text())["pid"] == __import__("os").getpid()
    markers.release(out)
    assert not (out / markers.LOCK).exists()
    # a lock from another host cannot be checked: refused, naming the file to delete if that run is gone
    (out / markers.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(markers.RunLockedError, match="elsewhere.*delete"):
        markers.acquire(out)


def test_overwrite_never_deletes_photos_that_link_into_the_output(run, write_subject, tmp_path):
    """Issue 27 item 6: a subject photo that is a symlink into a folder the run wrote (here export/)
    is refused, with or without --overwrite; the photo's content stays."""
    photos, out = write_subject(tmp_path / "photos", 3, 80), tmp_path / "run"
    code, err = run("--subject", str(photos), "--output", str(out))
    assert code == 0, err
    (photos / "02.png").rename(out / "export" / "02.png")
    (photos / "02.png").symlink_to(out / "export" / "02.png")
    before = (out / "export" / "02.png").read_bytes()
    for extra in (["--overwrite"], ["--resume"]):
        code, err = run("--subject", str(photos), "--output", str(out), *extra)
        line = error_line(err)
        assert code == 2 and "02.png" in line and "links to" in line, line
        assert (photos / "02.png").read_bytes() == before
    code, err = run("--subject", str(photos), "--output", str(tmp_path / "elsewhere"))
    assert code == 0, err  # the same photos train into another folder


_HOLD = ("import sys, time; from pathlib import Path; from cascade.runs import markers; "
         "markers.acquire(Path(sys.argv[1])); print('acquired', flush=True); time.sleep(60)")


def test_a_stale_lock_is_taken_over_by_one_writer_only(tmp_path, monkeypatch):
    """Issue 27 item 14: this process reads a stale lock; before it acts, another process takes the
    lock over (forced here, inside this process's read). Only one of them may hold the lock: this
    one is refused, naming the other, and the other's lock stays."""
    import os
    import socket
    import types

    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / markers.LOCK).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "start": "1",
                                                "since": "stale"}))
    other: list = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def loads(text, *args, **kwargs):
        value = json.loads(text, *args, **kwargs)
        if isinstance(value, dict) and value.get("since") == "stale" and not other:  # the interleaving
            other.append(subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                                          env=env))
            assert other[0].stdout.readline().strip() == "acquired"
        return value

    monkeypatch.setattr(markers, "json", types.SimpleNamespace(loads=loads, dumps=json.dumps, dump=json.dump))
    try:
        with pytest.raises(markers.RunLockedError) as e:
            markers.acquire(out)
        assert f"in use by process {other[0].pid}" in str(e.value)
        assert json.loads((out / markers.LOCK).read_text())["pid"] == other[0].pid
        assert sorted(p.name for p in out.iterdir()) == [markers.LOCK]  # no takeover or temp file left
    finally:
        for p in other:
            p.kill()
            p.wait()
        markers._held.discard(out)


def test_overwrite_never_deletes_the_validation_chain_model(run, write_subject, tmp_path, tiny):
    """Issue 27 item 14: validation.chain_model is an input like the others: an --output that holds
    it is refused with --overwrite, and the model stays."""
    import shutil

    photos, out = write_subject(tmp_path / "photos", 3, 80), tmp_path / "run"
    code, err = run("--subject", str(photos), "--output", str(out))
    assert code == 0, err
    partner = out / "checkpoints" / "my-sr"  # inside a folder the run wrote (--overwrite deletes it)
    shutil.copytree(tiny / "stage2", partner)
    before = _snapshot(partner)
    code, err = run("--subject", str(photos), "--output", str(out), "--overwrite", "--set", "stage1.validation.chain=true",
                    "--set", f"stage1.validation.chain_model={partner}")
    line = error_line(err)
    assert code == 2 and "contains the validation.chain_model folder" in line, line
    assert _snapshot(partner) == before

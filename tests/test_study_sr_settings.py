"""`cascade study-sr`'s step settings: a user's stage2.* values win unless a study.* value or a flag is
given, and the study says which applied (issue 28, item 4a). run_study is replaced by a recorder, so
nothing loads or trains."""
from __future__ import annotations

import pytest

from cascade.cli.main import main


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    from cascade.evaluation import sr_study

    seen = []

    def fake_run(req):
        seen.append(req)
        (tmp_path / "table.md").write_text("table\n")
        return tmp_path, []

    monkeypatch.setattr(sr_study, "run_study", fake_run)
    return seen


def _run(recorded, *args):
    assert main(["study-sr", "--subject", "photos", "--class-noun", "toy", "--train", *args]) == 0
    req = recorded[-1]
    return req.cfg.stage2.train.max_steps, req.cfg.stage2.sample.steps, getattr(req, "settings", None)


def _yaml(tmp_path, study: str = "") -> str:
    p = tmp_path / "mine.yaml"
    p.write_text("stage2:\n  train:\n    max_steps: 300\n  sample:\n    steps: 10\n" + study)
    return str(p)


def test_user_stage2_settings_win_without_a_study_section(recorded, tmp_path):
    mine = _yaml(tmp_path)
    steps, sample, lines = _run(recorded, "--config", mine)
    assert (steps, sample) == (300, 10)  # before the fix: the Study dataclass's 5 and 2
    assert any(line.startswith("stage2.train.max_steps = 300") and "study.max_steps" in line and "not applied" in line
               for line in lines)
    # a flag wins over the file; so does a study value given on the command line
    assert _run(recorded, "--config", mine, "--max-steps", "7")[:2] == (7, 10)
    assert _run(recorded, "--config", mine, "--set", "study.sample_steps=3")[:2] == (300, 3)


def test_a_study_section_wins_over_the_same_file_and_loses_to_set(recorded, tmp_path):
    mine = _yaml(tmp_path, "study:\n  max_steps: 40\n")
    steps, sample, lines = _run(recorded, "--config", mine)
    assert (steps, sample) == (40, 10)
    assert any(line == f"stage2.train.max_steps = 40 from study.max_steps ({mine}), not 300 ({mine})" for line in lines)
    # the tiny preset's own study section sizes its sweep; a --set of the stage II setting beats the file
    assert _run(recorded, "--config", "tiny")[:2] == (5, 2)
    assert _run(recorded, "--config", "tiny", "--set", "stage2.train.max_steps=9")[:2] == (9, 2)

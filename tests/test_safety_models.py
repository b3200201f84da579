"""A model folder never runs its own code (issue 27, item 2): a tokenizer or model config that asks for
custom code is refused in one line, before transformers could offer to run it, with or without a
terminal; the code never runs."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import error_line

REPO = Path(__file__).resolve().parents[1]


def _custom_code_folder(tiny: Path, dest: Path, flag: Path, where: str) -> Path:
    """A copy of the tiny stage I folder whose `where` config asks for code that would create `flag`."""
    shutil.copytree(tiny / "stage1", dest)
    code = f"open({str(flag)!r}, 'w')\nfrom transformers import T5TokenizerFast as EvilTokenizer\n"
    for folder in (dest, dest / "tokenizer", dest / "text_encoder"):  # transformers looks at the root
        (folder / "evil.py").write_text(code)
    config = dest / where
    data = json.loads(config.read_text())
    if where.startswith("tokenizer") and where.endswith("json"):
        data.update(auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}, tokenizer_class="EvilTokenizer")
    else:
        data["auto_map"] = {"AutoModel": "evil.EvilModel"}
    config.write_text(json.dumps(data))
    return dest


@pytest.mark.parametrize("stdin", ["y\n", ""])
@pytest.mark.parametrize("where", ["tokenizer/tokenizer_config.json", "text_encoder/config.json",
                                   "unet/config.json"])
def test_a_model_folder_with_custom_code_is_refused_in_one_line(tiny, tmp_path, cli, monkeypatch, stdin, where):
    """`identifier --set models.text_encoder=DIR`: answering "y" or having no terminal changes nothing."""
    flag = tmp_path / "pwned"
    folder = _custom_code_folder(tiny, tmp_path / "model", flag, where)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, err = cli("identifier", "--set", f"models.text_encoder={folder}")
    line = error_line(err)
    assert code == 2 and "models.text_encoder" in line and "own code" in line and where in line, line
    assert not flag.exists()
    code, err = cli("sample", "--prompt", "a dog", "--output", tmp_path / "out", "--set", f"models.stage1={folder}")
    line = error_line(err)
    assert code == 2 and "models.stage1" in line and "own code" in line, line
    assert not flag.exists() and not (tmp_path / "out").exists()


def test_echo_y_into_the_command_runs_no_code(tiny, cache_dir, tmp_path):
    """The command itself, `echo y | cascade identifier ...` and with no stdin at all."""
    flag = tmp_path / "pwned"
    folder = _custom_code_folder(tiny, tmp_path / "model", flag, "tokenizer/tokenizer_config.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "cascade", "identifier", "--set", f"models.cache_dir={cache_dir}",
            "--set", f"models.text_encoder={folder}"]
    for stdin in ("y\n", None):
        proc = subprocess.run(argv, input=stdin, stdin=subprocess.DEVNULL if stdin is None else None, env=env,
                              capture_output=True, text=True, timeout=120)
        line = error_line(proc.stderr)
        assert proc.returncode == 2 and "own code" in line, proc.stderr[-2000:]
        assert "[y/N]" not in proc.stdout + proc.stderr and not flag.exists()

"""scripts/device_check.py at tiny size on CPU: every record says what ran, the loss, the step times
and the planner's figure for the same step (the GPU run adds max_memory_allocated beside it)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_device_check_cells_cover_every_preset_and_engine_config():
    from cascade.perf import device_check

    names = [c.name for c in device_check.preset_cells()]
    # if-l's stage II is if-xl's (same model, same options): run once
    assert names == ["if-xl-stage1", "if-xl-stage2", "if-xl-stage1-lora8", "if-l-stage1", "if-m-stage1",
                     "if-m-stage2"]
    engines = {c.engine_config for c in device_check.engine_cells()}
    assert engines == {p.stem for p in device_check.ENGINE_CONFIGS.glob("*.yaml")}
    plan = device_check.plan_for(device_check.Cell("x", "if-xl", 1), "real", None)
    assert plan.model == "if-i-xl" and plan.batch == 4 and plan.prior


def test_device_check_runs_tiny_on_cpu_and_writes_each_cell(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "scripts/device_check.py", "--size", "tiny", "--steps", "1", "--cells",
                           "if-xl-stage1,if-xl-stage2,engine-ddp", "--budget", "900", "--cell-budget", "300",
                           "--engine-budget", "300", "--plans-wait", "300", "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "if-xl-stage1: ran" in proc.stdout
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and report["device"].startswith("cpu")
    assert report["autocast_emulation"]["status"].startswith("skipped")  # no CUDA to compare with
    cells = {c["cell"]: c for c in report["cells"]}
    assert set(cells) == {"if-xl-stage1", "if-xl-stage2", "engine-ddp"}
    for name, c in cells.items():
        assert c["status"] == "ran", (name, c)
        assert c["steps_run"] == 2 and len(c["step_s"]) == 1 and c["step_s"][0] > 0
        assert c["loss_finite"] is True and all(math.isfinite(v) and v > 0 for v in c["loss"])
        assert c["plan"]["model"] == f"tiny-stage{c['stage']}" and c["planned_peak"] > 0
        assert c["max_memory_allocated"] is None  # no GPU: CUDA's counter is absent, not faked
    assert cells["if-xl-stage1"]["plan"]["in_backward"] and cells["if-xl-stage1"]["plan"]["prior"]
    assert "8bit" in cells["if-xl-stage1"]["optimizer"]
    assert cells["engine-ddp"]["engine"] in ("NO", "MULTI_GPU", "MULTI_CPU")
    assert not cells["engine-ddp"]["plan"]["in_backward"]  # the engine cells turn in-backward off


def test_device_check_compares_the_autocast_emulation_with_cuda():
    """On a GPU the check compares the tensors autograd saves under real CUDA autocast with the
    planner's emulation on CPU; here the emulation side must already differ from the CPU rules (fp32
    norms saved), and without CUDA the comparison says it was skipped."""
    import torch

    from cascade.perf import device_check

    emulated = device_check.saved_dtypes(torch.device("cpu"), True)
    cpu_rules = device_check.saved_dtypes(torch.device("cpu"), False)
    assert [s for s, _ in emulated] == [s for s, _ in cpu_rules]  # the same tensors, other dtypes
    assert device_check._bytes(emulated) > 1.2 * device_check._bytes(cpu_rules)
    if not torch.cuda.is_available():
        assert device_check.autocast_check()["status"].startswith("skipped")

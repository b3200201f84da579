"""The engines' own checkpoint folders are checked before the engine reads them: FSDP's
torch.distributed.checkpoint folders (pickled `.metadata`, non-tensor entries read with
weights_only=False) and DeepSpeed's `*_states.pt` (read with weights_only=False). A crafted pickle in any
of them is refused in one line and never runs; what the engines really write passes (the real FSDP and
ZeRO-3 checkpoints: tests/test_engines_distributed.py)."""
from __future__ import annotations

import pathlib
import pickle
import warnings

import pytest
import torch

from stages.checkpoint import check_files
from stages.errors import InputError
from stages.library_checkpoints import dcp_refusal, folder_refusal


class Touch:
    """Unpickling this creates the marker file: the stand-in for any code a crafted file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _dcp_save(state: dict, folder):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def test_a_dcp_folder_of_plain_data_passes_and_a_pickled_entry_is_refused(tmp_path):
    marker = tmp_path / "ran"
    # single-process save (no process group)
    _dcp_save({"w": torch.arange(6.0), "lr": 0.1, "step": 3, "betas": (0.9, 0.999)}, tmp_path / "plain")
    assert dcp_refusal(tmp_path / "plain") is None
    _dcp_save({"w": torch.arange(6.0), "lr": Touch(marker)}, tmp_path / "crafted")
    reason = dcp_refusal(tmp_path / "crafted")
    assert reason is not None and "entry lr" in reason and "it calls" in reason and "\n" not in reason
    assert not marker.exists()


def test_a_crafted_dcp_metadata_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    _dcp_save({"w": torch.arange(6.0)}, tmp_path / "model")
    (tmp_path / "model" / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    reason = folder_refusal(tmp_path / "model")
    assert reason.startswith("model/.metadata is never unpickled") and "it calls" in reason
    assert not marker.exists()


def test_deepspeed_states_pass_with_its_own_classes_and_refuse_others(tmp_path):
    ds = pytest.importorskip("deepspeed")  # noqa: F841 - DeepSpeed's classes are what its files hold
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder = tmp_path / "ckpt" / "pytorch_model"
    folder.mkdir(parents=True)
    states = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights,
                                         "fp32": torch.zeros(4)}}, states)
    assert folder_refusal(folder) is None
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": Touch(marker)}, states)
    with pytest.raises(InputError) as e:
        check_files(tmp_path / "ckpt")  # the whole checkpoint: its subfolders are checked too
    line = str(e.value)
    assert "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt holds pickled objects" in line
    assert "\n" not in line and not marker.exists()

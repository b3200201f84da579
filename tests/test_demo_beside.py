"""The demo's jobs beside its trainings: a spawned child with its own thread, results in order, a
failed job named in one line, and everything in this process when there is a single thread."""
import functools
import operator
import os

import pytest
import torch

from cascade.cli import beside as demo_beside
from stages.errors import InputError
from tests.conftest import torch_threads


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


def test_jobs_run_in_a_child_beside_and_give_the_threads_back(two_threads):
    beside = demo_beside.Beside({"add": functools.partial(operator.add, 2, 3), "pid": os.getpid})
    assert torch.get_num_threads() == 1  # the child has the other core
    assert beside.join() == [5, beside.proc.pid] and beside.proc.pid != os.getpid()
    assert torch.get_num_threads() == 2 and set(beside.seconds) == {"add", "pid"}


def test_a_failed_job_is_named_in_one_line(two_threads):
    beside = demo_beside.Beside({"fine": functools.partial(operator.add, 1, 1), "bad": functools.partial(int, "x")})
    with pytest.raises(InputError, match=r"a job beside the trainings failed: bad: ValueError: invalid literal"):
        beside.join()
    assert torch.get_num_threads() == 2 and not beside.proc.is_alive()


def test_one_thread_runs_the_jobs_here_first():
    with torch_threads(1):
        beside = demo_beside.Beside({"pid": os.getpid})
        assert beside.proc is None and beside.join() == [os.getpid()]

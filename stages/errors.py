"""Errors that mean "your input is wrong": the `cascade` command prints them as one line, exit 2."""
import contextlib


class InputError(ValueError):
    """Bad user input (a file, folder or setting); the message names it."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: training stopped, nothing exported."""


WRITING = "cascade_writing"  # the attribute `writing` leaves on an exception: the path being written


@contextlib.contextmanager
def writing(path):
    """Names `path` on an exception raised while it is written: a full disk reaches us from torch,
    safetensors or a plain file write without a file name, and the command's one line says
    "writing PATH" (cascade/cli/failures.py). The innermost name wins."""
    try:
        yield
    except Exception as e:
        if getattr(e, WRITING, None) is None:
            try:
                setattr(e, WRITING, str(path))
            except AttributeError:  # an exception type without a __dict__
                pass
        raise

"""Errors that mean "your input is wrong": the `cascade` command prints them as one line, exit 2."""


class InputError(ValueError):
    """Bad user input (a file, folder or setting); the message names it."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: training stopped, nothing exported."""

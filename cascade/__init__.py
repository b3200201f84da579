"""cascade: DreamBooth for the DeepFloyd IF pixel cascade (the system around the stages)."""

__version__ = "0.1.0"

from cascade import quiet as _quiet  # noqa: E402 - third-party notices off in every process

_quiet.install()

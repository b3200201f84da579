"""cascade: DreamBooth for the DeepFloyd IF pixel cascade (the system around the stages)."""

__version__ = "0.1.0"

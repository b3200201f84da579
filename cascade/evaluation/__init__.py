"""Measurement: DreamBench metrics and their report, the SR fine-tuning study and its report, image metrics."""

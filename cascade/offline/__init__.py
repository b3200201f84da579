"""Offline parts: tiny random-initialised IF components and tiny metric models in the real layouts."""

"""The `cascade` command: the argument parser, one module per command group, and the demo."""

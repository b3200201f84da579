"""Entry point for `accelerate launch scripts/sample.py ...` (same arguments as `cascade sample`)."""
import sys

from cascade.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))

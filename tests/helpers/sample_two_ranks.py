"""Run under torchrun: sample through the tiny cascade with the images split across ranks."""
import sys

from cascade.cli import main

sys.exit(main(["sample", *sys.argv[1:]]))

"""Entry point for `accelerate launch scripts/train_stage1.py ...` / `torchrun ... scripts/train_stage1.py ...`
(same arguments as `cascade train stage1`)."""
import sys

from cascade.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", "stage1", *sys.argv[1:]]))

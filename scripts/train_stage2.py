"""Entry point for `accelerate launch scripts/train_stage2.py ...` / `torchrun ... scripts/train_stage2.py ...`
(same arguments as `cascade train stage2`)."""
import sys

from cascade.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", "stage2", *sys.argv[1:]]))

"""`python -m cascade ...`: the same as the `cascade` command (an entry point, like scripts/)."""
import sys

from cascade.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

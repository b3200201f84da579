"""Run under torchrun: the `cascade` command whose arguments are the JSON list in $CASCADE_ARGV
(torchrun's own parser would read options such as --num as abbreviations of its --numa-binding)."""
import json
import os
import sys

from cascade.cli.main import main

sys.exit(main(json.loads(os.environ["CASCADE_ARGV"])))

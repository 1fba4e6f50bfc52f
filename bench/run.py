"""`python bench/run.py [--quick] [--only lora] ...`: the same as `loraforge bench` (see `--help`)."""

import sys

from loraforge.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

"""``python -m loadgen TARGET ...``: the same as ``mailstorm load TARGET ...``."""

import sys

from loadgen.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m loadgen"))

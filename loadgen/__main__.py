"""``python -m mailstorm.load TARGET ...``: the same as ``mailstorm load TARGET ...``."""

import sys

from mailstorm.load.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m mailstorm.load"))

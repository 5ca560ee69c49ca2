"""``python -m mailstorm.sink``: the same as ``mailstorm sink``."""

import sys

from .cli import main

sys.exit(main(prog="python -m mailstorm.sink"))

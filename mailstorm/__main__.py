"""``python -m mailstorm``: the same as the ``mailstorm`` command."""

import sys

from .cli import main

sys.exit(main())

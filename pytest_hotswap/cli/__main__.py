"""``python -m pytest_hotswap.cli``: the ``pytest-hotswap`` command."""

import sys

from pytest_hotswap.cli import main

sys.exit(main())

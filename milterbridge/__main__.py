"""``python -m milterbridge``: the same as the ``milterbridge`` command."""

from __future__ import annotations

import sys

from milterbridge.cli import main

sys.exit(main())

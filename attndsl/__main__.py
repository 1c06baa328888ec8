"""`python -m attndsl ...` is the `attndsl` command."""

import sys

from .cli import main

sys.exit(main())

"""`python -m attndsl ...` is the `attndsl` command."""

import sys

from attndsl.cli import main

sys.exit(main())

"""The long fuzz run: `python scripts/fuzz.py --cases 100000` (tests/test_fuzz.py runs a
short seeded one in CI). Prints the counts and every failure; exit status 1 on any."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

if __name__ == "__main__":
    from fuzz.runner import main
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())

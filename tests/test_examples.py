"""Every example script runs to completion (from another working directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".py", ".sh"))
# scripts whose default run takes minutes: their own seconds-sized mode
ARGS = {"eval_patterns.py": ["--quick"]}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_example_runs(script, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if script.suffix == ".sh":
        if shutil.which("bash") is None:
            pytest.skip("no bash")
        cmd = ["bash", str(script)]
        cwd = ROOT
    else:
        cmd = [sys.executable, str(script), *ARGS.get(script.name, [])]
        cwd = tmp_path
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr

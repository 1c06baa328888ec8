"""The wheel carries the grammar and the standard library and works outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"building the wheel failed: {r.stderr[-2000:]}"
    (whl,) = out.glob("attndsl-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "attndsl/grammar/attn.lark" in names
    std = {p.name for p in (ROOT / "patterns").glob("*.attn")}
    assert {f"attndsl/patterns/{n}" for n in std} <= names
    assert "attndsl/codegen/__init__.py" in names
    assert "attndsl/codegen/cpu/flash.c" in names  # the native CPU kernel's source
    assert not any(n.startswith(("tests/", "examples/")) for n in names)


def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = (
        "import attndsl, sys\n"
        "assert attndsl.__file__.startswith(sys.argv[1]), attndsl.__file__\n"
        "op = attndsl.compile('patterns/neighborhood.attn', pattern='na2d', H=6, W=6, "
        "kernel=3)\n"
        "assert op.mask().sum(1).tolist() == [9] * 36\n"
        "print(sorted(attndsl.check('combiner.attn')))\n"
        "from attndsl.codegen.cpu import native\n"
        "assert native.SOURCE.is_file(), native.SOURCE\n"
        "import torch\n"
        "op = attndsl.compile('patterns/sliding.attn', 'sliding_window', N=40, window=8)\n"
        "q = torch.randn(1, 2, 40, 16)\n"
        "assert op(q, q, q, backend='cpu').shape == q.shape\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site), ATTNDSL_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "combiner_fixed" in r.stdout

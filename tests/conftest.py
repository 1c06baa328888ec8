"""Shared test options: `--update-golden` rewrites golden files instead of comparing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. It must be
# chosen before any kernel module is imported.
if not os.environ.get("TRITON_INTERPRET"):
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/* from the current output")


@pytest.fixture
def golden(request):
    """golden(name, text): compare text with tests/golden/name (or rewrite it)."""
    update = request.config.getoption("--update-golden")

    def check(name: str, text: str) -> None:
        path = ROOT / "tests" / "golden" / name
        if update or not path.exists() and os.environ.get("ATTNDSL_NEW_GOLDEN"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        assert path.exists(), f"missing golden file {path}; run pytest --update-golden"
        assert text == path.read_text(), f"{name} differs; inspect, then --update-golden"

    return check


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    """Tests name standard patterns as 'patterns/x.attn', relative to the repository."""
    monkeypatch.chdir(ROOT)


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Locates the data folders (grammar, standard patterns) in a wheel or a source checkout."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """`grammar` or `patterns`: inside the package when installed, beside it in a checkout."""
    for cand in (_HERE / name, _HERE.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"attndsl data folder '{name}' is missing from the installation")


def grammar_text() -> str:
    return (data_dir("grammar") / "attn.lark").read_text()


def stdlib_dir() -> Path:
    return data_dir("patterns")

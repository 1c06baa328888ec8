"""attndsl: a compiler for attention patterns written in .attn files."""

from attndsl.api import Op, check, compile, load
from attndsl.errors import (
    AttnError,
    AttnErrors,
    AttnNameError,
    AttnSyntaxError,
    AttnTypeError,
    ConstraintError,
    EvaluationError,
    ImportFailure,
    InputError,
    ParameterError,
    SizeLimitError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "AttnError", "AttnErrors", "AttnNameError", "AttnSyntaxError", "AttnTypeError",
    "ConstraintError", "EvaluationError", "ImportFailure", "InputError", "Op",
    "ParameterError", "SizeLimitError", "UnsupportedError", "check", "compile", "load",
]

"""Located errors: every problem a user can cause surfaces as an AttnError subclass."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

SHOWN_WIDTH = 160  # columns of a source line an error quotes


@dataclass(frozen=True, slots=True)
class Span:
    """A source region; columns are 1-based like compilers print them."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int
    text: str = ""  # the whole source line, kept so errors render without re-reading files

    def caret(self) -> str:
        return self.shown()[1]

    def shown(self) -> tuple[str, str]:
        """The source line as printed and the caret line under it. Characters that would
        not print as one column (tabs, control and format characters, separators) show as
        one column each, so the caret stays under its column; a line longer than
        SHOWN_WIDTH shows only a window around the caret."""
        line = "".join(c if c.isprintable() else " " if c == "\t" else "\ufffd"
                       for c in self.text.rstrip("\n"))
        col = max(1, self.col)
        width = max(1, self.end_col - col if self.end_line == self.line else 1)
        if len(line) > SHOWN_WIDTH:
            start = max(0, min(col - 1 - SHOWN_WIDTH // 3, len(line) - SHOWN_WIDTH + 3))
            stop = start + SHOWN_WIDTH - 3 * (start > 0)
            line = ("..." if start > 0 else "") + line[start:stop] + (
                "..." if stop < len(line) else "")
            col = col - start + 3 * (start > 0)
            width = min(width, len(line) - col + 1)
        return line, " " * (col - 1) + "^" + "~" * max(0, width - 1)


def printable(text: str) -> str:
    """Text with every character that would not print (control characters, line and
    paragraph separators) escaped, so a report is always one line per line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class AttnError(Exception):
    """Base of every error attndsl raises for bad input; `str()` is the full report."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, note: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.note = note

    def render(self) -> str:
        msg = printable(self.message)
        if self.span is None:
            head = f"error: {msg}"
            return head + (f"\n  note: {self.note}" if self.note else "")
        s = self.span
        out = [f"{printable(s.file)}:{s.line}:{s.col}: error: {msg}"]
        if s.text:
            line, caret = s.shown()
            out.append("    " + line)
            out.append("    " + caret)
        if self.note:
            out.append(f"  note: {self.note}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class AttnSyntaxError(AttnError):
    """The text does not follow the grammar."""


class AttnNameError(AttnError):
    """A name that is not defined (or defined twice)."""


class AttnTypeError(AttnError):
    """An expression of the wrong type, arity or shape."""


class ConstraintError(AttnError):
    """A `require` of the pattern fails for the given parameters."""


class ParameterError(AttnError):
    """A missing, unknown or ill-typed pattern parameter."""


class InputError(AttnError):
    """A run-time input or tensor of the wrong shape, dtype or device."""


class EvaluationError(AttnError):
    """An expression fails while being evaluated (division by zero, index out of range)."""


class SizeLimitError(AttnError):
    """A size beyond what the chosen backend can hold; raised before allocating."""


class PairLimitError(SizeLimitError):
    """Block tables of more pairs than one plan holds: larger blocks may fit (cp-plan
    --library retries with them)."""


class UnsupportedError(AttnError):
    """A combination of constructs the chosen backend does not implement."""


class ImportFailure(AttnError):
    """An imported file that cannot be found or read."""


class AttnErrors(AttnError):
    """Several errors found in one pass, reported together."""

    def __init__(self, errors: list[AttnError]):
        self.errors = list(errors)
        super().__init__(
            self.errors[0].message if len(errors) == 1 else f"{len(errors)} errors",
            self.errors[0].span,
        )

    def render(self) -> str:
        return "\n".join(e.render() for e in self.errors)


def did_you_mean(name: str, candidates) -> str:
    """A ' (did you mean 'x'?)' suffix, or '' when nothing is close. Case is ignored first
    ('W' for 'w'), then the closest spelling is looked for, also ignoring case."""
    name = str(name)
    cands = sorted({str(c) for c in candidates} - {name})
    same = [c for c in cands if c.lower() == name.lower()]
    if same:
        return f" (did you mean '{same[0]}'?)"
    lowered: dict[str, str] = {}
    for c in cands:
        lowered.setdefault(c.lower(), c)
    close = difflib.get_close_matches(name.lower(), sorted(lowered), n=1, cutoff=0.6)
    return f" (did you mean '{lowered[close[0]]}'?)" if close else ""


class ErrorSink:
    """Collects errors so that a pass reports all of them once, not just the first."""

    def __init__(self) -> None:
        self.errors: list[AttnError] = []
        self._seen: set = set()

    def add(self, err: AttnError) -> None:
        key = (type(err), err.message, err.span)
        if key not in self._seen:
            self._seen.add(key)
            self.errors.append(err)

    def raise_if_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise AttnErrors(self.errors)

"""Reads files, resolves imports (relative to the importing file, then the standard library)
and builds each module's scope. The standard `prelude.attn` is visible everywhere.

Import policy (docs/language.md, "Imports"): an import names a `.attn` file, and the file
it finds (after following links) must lie inside an import root: the folder of the file the
caller named (the working directory for source text), the standard library, or a folder the
caller allowed (`import_roots=[...]`, `--import-root`). A path outside them is refused
before the file system is asked about it, so a `.attn` file can neither read nor probe the
rest of the disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from attndsl._resources import stdlib_dir
from attndsl.errors import (
    AttnNameError,
    AttnSyntaxError,
    ErrorSink,
    ImportFailure,
    Span,
    did_you_mean,
)
from attndsl.lang import ir
from attndsl.lang.parser import normalize, parse_text

PRELUDE = "prelude.attn"
MAX_SOURCE_BYTES = 1 << 24  # a larger .attn file is refused unread (16 MiB)


def resolve_path(path: str | Path, base: Path | None = None) -> Path | None:
    """The file a caller names: an existing file wins; else the standard library copy of a
    bare name (`x.attn` or `patterns/x.attn`). None when there is none (or the name cannot
    be a file name at all)."""
    p = Path(path)
    cands = [base / p] if base is not None and not p.is_absolute() else []
    cands.append(p)
    if p.parent in (Path("."), Path("patterns")):  # only bare names reach the library
        cands.append(stdlib_dir() / p.name)
    for c in cands:
        try:
            if c.is_file():
                return c.resolve()
        except (OSError, ValueError):  # too long, or a NUL character: no such file
            continue
    return None


def decode(data: bytes, file: str) -> str:
    """UTF-8 text, or a located error at the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lines = normalize(data[:e.start].decode("utf-8")).split("\n")
        rest = normalize(data[e.start:].decode("utf-8", errors="replace")).split("\n")[0]
        line, col = len(lines), len(lines[-1]) + 1
        raise AttnSyntaxError(f"the file is not UTF-8 text: byte 0x{data[e.start]:02x} "
                              f"({e.reason})", Span(file, line, col, line, col + 1,
                                                    lines[-1] + rest)) from None


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


class Loader:
    """Caches parsed modules so diamond imports parse once; detects import cycles; enforces
    the import roots. `import_roots` are folders (besides the named file's own and the
    standard library) that imports may read."""

    def __init__(self, import_roots: Iterable[str | os.PathLike] = ()) -> None:
        self.modules: dict[str, ir.Module] = {}
        self.registry: dict[str, ir.Module] = {}
        self._loading: list[str] = []
        self.extra_roots = [Path(r) for r in import_roots]
        self.roots: list[str] | None = None  # lexical roots, set by the first load
        self.real_roots: list[str] = []  # the same with links resolved

    def _set_roots(self, home: Path) -> None:
        if self.roots is not None:
            return
        folders = [home, stdlib_dir(), *self.extra_roots]
        self.roots = [os.path.normpath(os.path.abspath(f)) for f in folders]
        self.real_roots = [os.path.realpath(f) for f in folders]

    def load_text(self, text: str, name: str = "<string>", base: Path | None = None) -> ir.Module:
        """Source text; its imports are relative to `base` (the working directory), which
        is also its import root."""
        base = base or Path.cwd()
        self._set_roots(base)
        items = parse_text(text, name)
        return self._build(name, items, base, text)

    def load_file(self, path: Path, span=None) -> ir.Module:
        """A file: the one the caller named (its folder becomes an import root), or one an
        import resolved (see _resolve_import)."""
        self._set_roots(Path(path).parent)
        key = str(path)
        if key in self.modules:
            return self.modules[key]
        if key in self._loading:
            cycle = " -> ".join(Path(p).name for p in self._loading + [key])
            raise ImportFailure(f"import cycle: {cycle}", span)
        text = self._read(path, span)
        self._loading.append(key)
        try:
            items = parse_text(text, _display(path))
            mod = self._build(_display(path), items, path.parent, text)
        finally:
            self._loading.pop()
        self.modules[key] = mod
        return mod

    def _read(self, path: Path, span) -> str:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SOURCE_BYTES + 1)
        except OSError as e:
            raise ImportFailure(f"cannot read '{_display(path)}': {e.strerror or e}",
                                span) from None
        if len(data) > MAX_SOURCE_BYTES:
            raise ImportFailure(f"'{_display(path)}' is larger than {MAX_SOURCE_BYTES:,} "
                                "bytes, the largest .attn file read", span)
        return decode(data, _display(path))

    def _resolve_import(self, item: ir.Import, base: Path) -> Path:
        """The file an import names, under the import policy, or a located ImportFailure."""
        raw = item.path
        shown = raw if len(raw) <= 80 else raw[:77] + "..."
        if not raw.endswith(".attn") or "\0" in raw:
            raise ImportFailure(f"an import names a .attn file, not '{shown}'", item.span)
        p = Path(raw)
        cands = [base / p] if not p.is_absolute() else [p]
        if not p.is_absolute():
            cands.append(p)  # relative to the working directory
        if p.parent in (Path("."), Path("patterns")):
            cands.append(stdlib_dir() / p.name)
        refused = False
        for c in cands:
            if not _inside(os.path.normpath(os.path.abspath(c)), self.roots):
                refused = refused or c is cands[0]
                continue  # outside every root: not even asked whether it exists
            try:
                found = c.is_file()
            except (OSError, ValueError) as e:
                reason = getattr(e, "strerror", None) or str(e)
                raise ImportFailure(f"cannot read imported file '{shown}': {reason}",
                                    item.span) from None
            if not found:
                continue
            real = Path(os.path.realpath(c))
            if not _inside(str(real), self.real_roots) or real.suffix != ".attn":
                raise ImportFailure(f"imported file '{shown}' is a link to a file outside "
                                    "the folders imports may read", item.span)
            return real
        if refused:
            raise ImportFailure(
                f"'{shown}' is outside the folders imports may read (the named file's "
                "folder and the standard library); allow another with import_roots=[...] "
                "or --import-root", item.span)
        raise ImportFailure(f"cannot find imported file '{shown}'", item.span)

    def _build(self, name: str, items: tuple, base: Path, text: str | None = None
               ) -> ir.Module:
        sink = ErrorSink()
        scope: dict[str, object] = {}
        is_prelude = Path(name).name == PRELUDE and Path(name).parent.resolve() == stdlib_dir()
        if not is_prelude:
            prelude = self.load_file(stdlib_dir() / PRELUDE)
            for k, v in prelude.scope.items():
                if isinstance(v, ir.FnDef | ir.ConstDef) and v.file == prelude.path:
                    scope[k] = v
        own: dict[str, object] = {}
        for item in items:
            if isinstance(item, ir.Import):
                try:
                    mod = self.load_file(self._resolve_import(item, base), item.span)
                except ImportFailure as e:
                    sink.add(e)
                    continue
                exported = {k: v for k, v in mod.scope.items()
                            if getattr(v, "file", None) == mod.path}
                if item.names is None:
                    scope.update(exported)
                else:
                    for n in item.names:
                        if n not in exported:
                            sink.add(AttnNameError(
                                f"'{item.path}' defines no '{n}'" + did_you_mean(n, exported),
                                item.span))
                        else:
                            scope[n] = exported[n]
        for item in items:
            if isinstance(item, ir.PatternDef | ir.FnDef | ir.ConstDef):
                if item.name in own:
                    prev = own[item.name]
                    sink.add(AttnNameError(
                        f"'{item.name}' is defined twice (first at line {prev.span.line})",
                        item.span))
                    continue
                own[item.name] = item
        sink.raise_if_any()
        scope.update(own)
        mod = ir.Module(name, items, scope, self.registry, text)
        self.registry[name] = mod
        return mod


def _display(path: Path) -> str:
    """Paths relative to the working directory read best in error messages."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)

"""Reads files, resolves imports (relative to the importing file, then the standard library)
and builds each module's scope. The standard `prelude.attn` is visible everywhere."""

from __future__ import annotations

from pathlib import Path

from attndsl._resources import stdlib_dir
from attndsl.errors import AttnNameError, ErrorSink, ImportFailure, did_you_mean
from attndsl.lang import ir
from attndsl.lang.parser import parse_text

PRELUDE = "prelude.attn"


def resolve_path(path: str | Path, base: Path | None = None) -> Path | None:
    """An existing file wins; else the standard library copy (`patterns/x.attn` or `x.attn`)."""
    p = Path(path)
    cands = [base / p] if base is not None and not p.is_absolute() else []
    cands.append(p)
    std = stdlib_dir()
    if p.parent in (Path("."), Path("patterns")):  # only bare names reach the library
        cands.append(std / p.name)
    for c in cands:
        if c.is_file():
            return c.resolve()
    return None


class Loader:
    """Caches parsed modules so diamond imports parse once; detects import cycles."""

    def __init__(self) -> None:
        self.modules: dict[str, ir.Module] = {}
        self.registry: dict[str, ir.Module] = {}
        self._loading: list[str] = []

    def load_text(self, text: str, name: str = "<string>", base: Path | None = None) -> ir.Module:
        items = parse_text(text, name)
        return self._build(name, items, base or Path.cwd(), text)

    def load_file(self, path: Path, span=None) -> ir.Module:
        key = str(path)
        if key in self.modules:
            return self.modules[key]
        if key in self._loading:
            cycle = " -> ".join(Path(p).name for p in self._loading + [key])
            raise ImportFailure(f"import cycle: {cycle}", span)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ImportFailure(f"cannot read '{path}': {e}", span) from None
        self._loading.append(key)
        try:
            items = parse_text(text, _display(path))
            mod = self._build(_display(path), items, path.parent, text)
        finally:
            self._loading.pop()
        self.modules[key] = mod
        return mod

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
                target = resolve_path(item.path, base)
                if target is None:
                    sink.add(ImportFailure(f"cannot find imported file '{item.path}'", item.span))
                    continue
                try:
                    mod = self.load_file(target, item.span)
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

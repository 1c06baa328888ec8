"""The IR: immutable, slotted nodes, each with the source span it came from.

The parser builds untyped nodes (`ty is None`); the checker returns copies with `ty` set and
names resolved (`ref`), so the same classes serve both stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span

# ---------------------------------------------------------------- types


@dataclass(frozen=True, slots=True)
class Type:
    """`kind` is int|bool|float|token|array|summary|none; `n` the per-axis width (None: scalar).

    `static` marks values known from parameters alone (no q, k, h or run-time input).
    """

    kind: str
    n: int | None = None
    static: bool = True
    space: str | None = None  # token/summary: the space name; array: element kind
    dims: tuple = ()  # array dims (None for '*'); token/summary: axis names
    optional: bool = False

    def __str__(self) -> str:
        if self.kind == "token":
            return f"token<{self.space}>"
        if self.kind == "summary":
            return f"summary<{self.space}>"
        if self.kind == "array":
            from .printer import expr_source
            dims = ", ".join("*" if d is None else expr_source(d) if isinstance(d, Expr)
                             else str(d) for d in self.dims)
            return f"{self.space}[{dims}]" + (" optional" if self.optional else "")
        if self.n is None:
            return self.kind
        return f"{self.kind}[{self.n}]"

    def scalar(self) -> Type:
        return Type(self.kind, None, self.static)

    def dyn(self) -> Type:
        return Type(self.kind, self.n, False, self.space, self.dims, self.optional)


INT = Type("int")
BOOL = Type("bool")
FLOAT = Type("float")
NONE = Type("none")


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True, slots=True)
class Expr:
    span: Span


@dataclass(frozen=True, slots=True)
class IntLit(Expr):
    value: int
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class FloatLit(Expr):
    value: float
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class BoolLit(Expr):
    value: bool
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class Name(Expr):
    id: str
    ty: Type | None = None
    ref: str | None = None  # param|local|const|q|k|h|input|summary


@dataclass(frozen=True, slots=True)
class TupleLit(Expr):
    items: tuple[Expr, ...]
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class Unary(Expr):
    op: str  # '-', '~', 'not'
    operand: Expr
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class Binary(Expr):
    op: str  # + - * / // % ** & | ^ << >> and or
    left: Expr
    right: Expr
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class Compare(Expr):
    """A Python-style comparison chain: `a < b <= c` means `a < b and b <= c`."""

    ops: tuple[str, ...]
    operands: tuple[Expr, ...]
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class IfExpr(Expr):
    cond: Expr
    then: Expr
    orelse: Expr
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class LetExpr(Expr):
    name: str
    value: Expr
    body: Expr
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class Keyword:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Call(Expr):
    """A call; after checking `ref` says builtin|fn|pattern.

    For `fn` the checker stores the callee instantiated at this call site: `params` are the
    bound names in order (defaults filled into `args`) and `body` its typed body.
    """

    func: str
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...] = ()
    ty: Type | None = None
    ref: str | None = None
    params: tuple[str, ...] = ()
    body: Expr | None = None
    defaults: tuple[bool, ...] = ()  # fn: which args are the callee's defaults


@dataclass(frozen=True, slots=True)
class Index(Expr):
    base: Expr
    index: Expr
    ty: Type | None = None


@dataclass(frozen=True, slots=True)
class Attr(Expr):
    base: Expr
    name: str
    ty: Type | None = None


# ---------------------------------------------------------------- declarations


@dataclass(frozen=True, slots=True)
class TypeRef:
    name: str
    dims: tuple[Expr | None, ...] | None  # None: scalar; a None dim is '*'
    span: Span


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: TypeRef
    default: Expr | None
    span: Span


@dataclass(frozen=True, slots=True)
class LetStmt:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class SpaceStmt:
    role: str  # space|query|key
    kind: str  # seq|grid|volume|channels
    sizes: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class RequireStmt:
    cond: Expr
    message: str | None
    span: Span


@dataclass(frozen=True, slots=True)
class InputStmt:
    name: str
    type: TypeRef
    optional: bool
    span: Span


@dataclass(frozen=True, slots=True)
class HeadsStmt:
    count: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class HeadRange:
    lo: Expr
    hi: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class RuleStmt:
    kind: str  # attend|exclude|within
    expr: Expr
    span: Span
    heads: HeadRange | None = None


@dataclass(frozen=True, slots=True)
class ScoreStmt:
    kind: str  # bias|softcap|scale
    expr: Expr
    span: Span
    heads: HeadRange | None = None


@dataclass(frozen=True, slots=True)
class SummaryAxis:
    name: str
    size: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class SummaryStmt:
    """Summary tokens: keys grouped into regions, each reduced to one key/value row."""

    name: str
    axes: tuple[SummaryAxis, ...]
    member: Expr | None
    attend: Expr | None
    pools: tuple[tuple[str, str, Span], ...]  # (keys|values|queries, max|mean|expectation)
    span: Span


@dataclass(frozen=True, slots=True)
class RouteStmt:
    input: str
    top: Expr
    shared: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class PatternRef:
    name: str
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class AverageStmt:
    parts: tuple[PatternRef, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class IncludeStmt:
    ref: PatternRef
    span: Span


@dataclass(frozen=True, slots=True)
class NnzStmt:
    """The number of attended pairs in closed form, valid where `when` holds."""

    expr: Expr
    when: Expr | None
    span: Span


@dataclass(frozen=True, slots=True)
class HeadBlock:
    heads: HeadRange
    body: tuple
    span: Span


@dataclass(frozen=True, slots=True)
class PatternDef:
    name: str
    params: tuple[Param, ...]
    body: tuple
    doc: str
    span: Span
    file: str = ""


@dataclass(frozen=True, slots=True)
class FnDef:
    name: str
    params: tuple[Param, ...]
    ret: TypeRef
    lets: tuple[LetStmt, ...]
    body: Expr
    doc: str
    span: Span
    file: str = ""


@dataclass(frozen=True, slots=True)
class ConstDef:
    name: str
    value: Expr
    doc: str
    span: Span
    file: str = ""


@dataclass(frozen=True, slots=True)
class Import:
    path: str
    names: tuple[str, ...] | None  # None: everything
    span: Span


@dataclass(frozen=True, slots=True)
class Module:
    """One parsed file; `scope` maps every visible name (own and imported) to its definition."""

    path: str
    items: tuple
    scope: dict = field(default_factory=dict, compare=False, hash=False)
    # every module loaded with this one, by path: a definition's names resolve in its own file
    registry: dict = field(default_factory=dict, compare=False, hash=False)
    text: str | None = field(default=None, compare=False, hash=False)  # the source read

    def home(self, item) -> Module:
        """The module that defines `item` (imported names live in their own file's scope)."""
        return self.registry.get(getattr(item, "file", None), self)

    def patterns(self) -> list[PatternDef]:
        return [i for i in self.items if isinstance(i, PatternDef)]

"""The IR: immutable, slotted nodes, each with the source span it came from.

The parser builds untyped nodes (`ty is None`); the checker returns copies with `ty` set and
names resolved (`ref`), so the same classes serve both stages. The checker's output for a
whole pattern, `CheckedPattern`, lives here too: every later stage reads it and none of
them needs the checker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attndsl.errors import Span

INT_LIMIT = 1 << 63  # integers are signed 64-bit: |value| < INT_LIMIT

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
            dims = ", ".join("*" if d is None else source(d) if isinstance(d, Expr)
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
    """A name; after checking `ref` says what it is (param|local|const:FILE|q|k|h|input|
    summary) and, for a constant, `value` is its typed defining expression."""

    id: str
    ty: Type | None = None
    ref: str | None = None
    value: Expr | None = None


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
    """A call; after checking `ref` says builtin|fn|pattern|dynamic.

    For `fn` the checker stores the callee instantiated for the argument types at this call
    site: `params` are the bound names in order (defaults filled into `args`) and `body` its
    typed body. For `pattern`, `callee` is the called pattern's CheckedPattern.
    """

    func: str
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...] = ()
    ty: Type | None = None
    ref: str | None = None
    params: tuple[str, ...] = ()
    body: Expr | None = None
    defaults: tuple[bool, ...] = ()  # fn: which args are the callee's defaults
    callee: CheckedPattern | None = None


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
    """`name: size`, or `name: size = expr`: an axis bound to a value of the query (a query
    attends only the tokens whose coordinate on this axis equals it)."""

    name: str
    size: Expr
    span: Span
    bound: Expr | None = None


@dataclass(frozen=True, slots=True)
class SummaryStmt:
    """Summary tokens: keys grouped into regions, each reduced to one key/value row."""

    name: str
    axes: tuple[SummaryAxis, ...]
    member: Expr | None
    attend: Expr | None
    pools: tuple[tuple[str, str, Span], ...]  # (keys|values|queries, max|mean|expectation)
    span: Span
    given: tuple[tuple[str, str, Span], ...] = ()  # (keys|values, input name): `from`
    at: Expr | None = None  # `queries at EXPR`: the query of the token at these coordinates
    scores: tuple[tuple[str, Expr, Span], ...] = ()  # (bias, expr)


@dataclass(frozen=True, slots=True)
class RouteStmt:
    """`route INPUT top K shared S` and its options: `scaled E` (routed gates times E),
    `hard B` (kept routed heads get 1, not their softmax), `weighted INPUT` (the shared
    heads' logits), `grouped INPUT` (two group logits)."""

    input: str
    top: Expr
    shared: Expr
    span: Span
    scaled: Expr | None = None
    hard: Expr | None = None
    weighted: Expr | None = None  # a Name of a run-time input
    grouped: Expr | None = None


@dataclass(frozen=True, slots=True)
class PatternRef:
    """`include P(...)` or a part of `average`; after checking `checked` is P's typed IR."""

    name: str
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]
    span: Span
    checked: CheckedPattern | None = None


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


# ---------------------------------------------------------------- the checker's output


@dataclass(frozen=True, slots=True)
class Space:
    kind: str
    sizes: tuple[Expr, ...]
    axes: tuple[str, ...]
    span: Span
    inherited: bool = False  # taken from an included pattern; sizes come from binding


@dataclass(frozen=True, slots=True)
class InputDecl:
    name: str
    kind: str  # int|float|bool
    dims: tuple  # () scalar; a None item is '*'
    optional: bool
    span: Span


@dataclass(frozen=True, slots=True)
class Summary:
    """A checked summary. `keys` / `values` name a pooling, or are "input" with the input in
    `keys_from` / `values_from`; `member` is None for a summary whose keys and values are
    both given (it summarises no key the analysis knows of); `queries_at` is the query
    position (flat index or coordinates) of `values expectation` taken at one token; `bias`
    a score term on its tokens."""

    name: str
    axes: tuple[SummaryAxis, ...]
    member: Expr | None
    attend: Expr
    keys: str
    values: str
    queries: str
    span: Span
    keys_from: str | None = None
    values_from: str | None = None
    queries_at: Expr | None = None
    bias: Expr | None = None

    @property
    def extended(self) -> bool:
        """Computed by the driver for every backend (given keys or values, a bias, bound
        axes, queries at one token), not by a core's summary kernel."""
        return (self.keys_from is not None or self.values_from is not None
                or self.bias is not None or self.queries_at is not None
                or any(a.bound is not None for a in self.axes))


@dataclass(frozen=True, eq=False)
class CheckedPattern:
    """The typed IR of one pattern; every expression in it has `ty` set, every name its
    `ref`, every called function its instantiated body and every called or included pattern
    its own CheckedPattern. Equal (and hashed) by `key`: the pattern's file, name and span
    and a digest of the source texts it was checked from."""

    name: str
    params: tuple[tuple[Param, Type], ...]
    doc: str
    span: Span
    file: str
    qspace: Space | None
    kspace: Space | None
    lets: tuple[LetStmt, ...]
    requires: tuple[RequireStmt, ...]
    inputs: tuple[InputDecl, ...]
    heads: Expr | None
    rules: tuple[RuleStmt, ...]
    scores: tuple[ScoreStmt, ...]
    summaries: tuple[Summary, ...]
    route: RouteStmt | None
    average: tuple[tuple[str, PatternRef], ...]
    includes: tuple[PatternRef, ...]
    uses_h: bool
    uses_content: bool
    nnz: NnzStmt | None = None
    key: tuple = ()
    text: str | None = None  # the source text of the file that defines the pattern

    @property
    def channel(self) -> bool:
        return self.qspace is not None and self.qspace.kind == "channels"

    def __eq__(self, other) -> bool:
        return isinstance(other, CheckedPattern) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


# ---------------------------------------------------------------- expressions as text

_PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "|": 5, "^": 6, "&": 7, "<<": 8, ">>": 8,
         "+": 9, "-": 9, "*": 10, "/": 10, "//": 10, "%": 10, "neg": 11, "~": 11, "**": 12}


def _prec(e) -> int:
    if isinstance(e, Binary):
        return _PREC[e.op]
    if isinstance(e, Compare):
        return _PREC["cmp"]
    if isinstance(e, Unary):
        return _PREC["not"] if e.op == "not" else _PREC["neg"]
    if isinstance(e, IfExpr | LetExpr):
        return 0
    return 13


def source(e: Expr) -> str:
    """Source text for an expression, with the parentheses its precedence needs."""
    def sub(x, min_prec):
        s = source(x)
        return f"({s})" if _prec(x) < min_prec else s

    if isinstance(e, IntLit):
        return str(e.value)
    if isinstance(e, FloatLit):
        return repr(e.value)
    if isinstance(e, BoolLit):
        return "true" if e.value else "false"
    if isinstance(e, Name):
        return e.id
    if isinstance(e, TupleLit):
        inner = ", ".join(source(i) for i in e.items)
        return f"({inner},)" if len(e.items) == 1 else f"({inner})"
    if isinstance(e, Unary):
        if e.op == "not":
            return "not " + sub(e.operand, _PREC["not"])
        return e.op + sub(e.operand, _PREC["neg"])
    if isinstance(e, Binary):
        p = _PREC[e.op]
        if e.op == "**":
            return f"{sub(e.left, p + 1)} ** {sub(e.right, p - 1)}"
        return f"{sub(e.left, p)} {e.op} {sub(e.right, p + 1)}"
    if isinstance(e, Compare):
        p = _PREC["cmp"] + 1
        parts = [sub(e.operands[0], p)]
        for op, x in zip(e.ops, e.operands[1:]):
            parts += [op, sub(x, p)]
        return " ".join(parts)
    if isinstance(e, IfExpr):
        return f"if {source(e.cond)} then {source(e.then)} else {source(e.orelse)}"
    if isinstance(e, LetExpr):
        return f"let {e.name} = {source(e.value)} in {source(e.body)}"
    if isinstance(e, Call):
        args = [source(a) for a in e.args]
        args += [f"{k.name} = {source(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(args)})"
    if isinstance(e, Index):
        return f"{sub(e.base, 13)}[{source(e.index)}]"
    if isinstance(e, Attr):
        return f"{sub(e.base, 13)}.{e.name}"
    raise TypeError(type(e).__name__)  # pragma: no cover

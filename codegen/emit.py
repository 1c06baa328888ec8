"""Typed IR expressions -> straight-line code, for Triton kernels or PyTorch mask_mods.

Everything static (parameters, constants, static lets) is folded to a literal by the
reference evaluator, so the generated code holds only what depends on q, k, h or run-time
inputs. Integer semantics follow the language (floor division, non-negative modulo), via
helpers of codegen/triton/kernels.py (and TORCH_HELPERS). Nothing from the .attn text is
pasted into the code: only numbers, operators chosen from fixed tables, and names this
module invents. Each built-in has one entry in BUILTIN_IMPLS; each dialect (Triton, PyTorch)
spells the operators.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from attndsl.errors import AttnError, EvaluationError, UnsupportedError
from attndsl.lang import ir
from attndsl.lang.walk import names
from attndsl.semantics import rules
from attndsl.semantics.bind import BoundPattern, bind_cached, call_values
from attndsl.semantics.evaluate import Evaluator, call_builtin, fn_locals, fold, token_field
from attndsl.semantics.evaluate import binop as eval_binop


@dataclass(frozen=True, slots=True)
class Code:
    """A generated variable (or expression) of kind int|float|bool."""

    text: str
    kind: str


@dataclass(frozen=True, slots=True)
class Tok:
    index: Code
    pos: tuple
    shape: tuple
    axes: tuple


@dataclass(frozen=True, slots=True)
class SummaryCode:
    """A summary token's region coordinates (axis name -> Code)."""

    coords: dict


@dataclass(frozen=True, slots=True)
class Arr:
    """A run-time input (array or scalar) of the kernel: its name, its slot in the packed
    inputs (kernels.py: INI / INF) and its element kind."""

    name: str
    slot: int
    kind: str
    scalar: bool = False


def input_layout(bp: BoundPattern, sizes: tuple[str, ...] = ()) -> dict[str, Arr]:
    """The run-time values a compiled mask or bias reads, with their slots: the inputs the
    pattern (and what it includes) declares that its rules or its biases read (not the
    route's, nor the given keys and values of summary tokens, which never reach a kernel);
    then the size parameters `sizes` (scalars) of a kernel that serves every size."""
    out: dict[str, Arr] = {}
    read = bp.mask_inputs | bp.bias_inputs
    for owner in bp.owners():
        for name, spec in owner.inputs.items():
            if name not in read or name in out:
                continue
            out[name] = Arr(name, len(out), spec.kind, not spec.dims)
    for name in sizes:
        out[name] = Arr(name, len(out), "int", True)
    return out


@dataclass(frozen=True)
class Rows:
    """An input of several dimensions indexed on its leading ones: the flat offset of the
    rows so far (code or int) and the dimensions after them."""

    arr: Arr
    offset: object
    dims: tuple


class NeedsSizes(Exception):
    """The pattern cannot be compiled with its sizes left to run time (a pattern called
    with size-dependent arguments, an included pattern): generate one kernel per size."""


def size_dependent(bp: BoundPattern, sizes) -> set[str]:
    """The size parameters and the static lets whose values depend on them."""
    out = set(sizes)
    for let in bp.checked.lets:
        if let.value.ty.static and any(n.id in out for n in names(let.value)):
            out.add(let.name)
    return out


def dynamic_config(bp: BoundPattern) -> dict | None:
    """chunk_topk's (block, chunk, topk, starts input) of a content-dependent pattern, as
    the emitter folds its arguments: what every backend's per-call selection reads."""
    if not bp.content_dependent:
        return None
    em = Emitter(bp, TritonDialect(), input_layout(bp))
    em.dynamic = {}
    em.predicate({"q": em.token("q_idx", em.space_shape(bp.checked.qspace),
                                bp.checked.qspace.axes),
                  "k": em.token("k_idx", em.space_shape(bp.checked.kspace),
                                bp.checked.kspace.axes),
                  "h": Code("h", "int")})
    return em.dynamic


@contextlib.contextmanager
def _located(span):
    """An AttnError raised without a location gets `span`: the innermost expression (or
    statement) being compiled when it happened."""
    try:
        yield
    except AttnError as err:
        if err.span is None:
            err.span = span
        raise


class Dialect:
    """Operator spellings shared by both targets; subclasses differ where the APIs do."""

    def where(self, c, a, b):
        return f"{self.NS}.where({c}, {a}, {b})"

    def int_lit(self, v: int) -> str:
        return str(v)


class TritonDialect(Dialect):
    NS = "tl"
    NOT = "_not({})"
    FDIV, FMOD = "_fdiv({}, {})", "_fmod({}, {})"
    MIN, MAX = "tl.minimum({}, {})", "tl.maximum({}, {})"
    TO_FLOAT = "({}).to(tl.float32)"
    TO_INT = "({}).to(tl.int64)"
    FLOOR = "tl.floor({}).to(tl.int64)"
    SQRT, EXP, LOG, TANH = "tl.sqrt({})", "tl.exp({})", "tl.log({})", "_tanh({})"
    ABS = "tl.abs({})"

    def int_lit(self, v: int) -> str:
        # Triton types an int literal in [2^31, 2^32) as uint32, which int64 code cannot
        # divide by: past int32, a literal is an explicit int64
        return str(v) if -(1 << 31) <= v < 1 << 31 else f"tl.full([], {v}, tl.int64)"

    def load(self, arr, idx):
        if arr.kind == "float":
            return f"_in_float(INI, INF, {arr.slot}, {idx})"
        v = f"_in_int(INI, {arr.slot}, {idx})"
        return f"({v} != 0)" if arr.kind == "bool" else v

    def scalar(self, arr):
        return self.load(arr, "0")


class TorchDialect(Dialect):
    NS = "torch"
    NOT = "torch.logical_not({})"
    FDIV, FMOD = "torch.div({}, {}, rounding_mode='floor')", "torch.remainder({}, {})"
    MIN, MAX = "torch.minimum(_t({}), _t({}))", "torch.maximum(_t({}), _t({}))"
    TO_FLOAT = "_t({}).to(torch.float32)"
    TO_INT = "_t({}).to(torch.int64)"
    FLOOR = "torch.floor({}).to(torch.int64)"
    SQRT, EXP, LOG, TANH = "torch.sqrt({})", "torch.exp({})", "torch.log({})", "torch.tanh({})"
    ABS = "torch.abs(_t({}))"

    def where(self, c, a, b):
        return f"torch.where({c}, _t({a}), _t({b}))"

    def load(self, arr, idx):
        name = f"in_{arr.name}"
        return f"{name}[torch.clamp({idx}, 0, {name}.shape[0] - 1)]"

    def scalar(self, arr):
        return f"in_{arr.name}"


TORCH_HELPERS = '''
def _t(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x)
'''


def prune(lines: list[str], results: list[str]) -> list[str]:
    """Drop assignments nobody reads (both sides of an `if` are emitted, and token
    coordinates are emitted whether used or not); the rest keep their order."""
    import re
    word = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    live = set()
    for r in results:
        live |= set(word.findall(r))
    kept = []
    for line in reversed(lines):
        target, expr = line.split(" = ", 1)
        if target in live:
            kept.append(line)
            live |= set(word.findall(expr))
    return kept[::-1]


class Emitter:
    """Emits the attend predicate (and bias terms) of a bound pattern as code lines."""

    def __init__(self, bp: BoundPattern, dialect: Dialect, inputs: dict[str, Arr],
                 sizes: tuple[str, ...] = ()):
        self.bp = bp
        self.d = dialect
        self.inputs = inputs  # run-time input name -> Arr (see input_layout)
        self.sizes = tuple(sizes)  # size parameters read at run time (inputs holds their slots)
        if sizes and bp.owners() != [bp]:
            raise NeedsSizes("included patterns")
        self.lines: list[str] = []
        self.n = 0
        self.memo: dict = {}
        self.dynamic: dict | None = None  # set to {} to compile chunk_topk (Triton only)

    # -------------------------------------------------------------- plumbing
    def fresh(self, text: str, kind: str) -> Code:
        self.n += 1
        name = f"t{self.n}"
        self.lines.append(f"{name} = {text}")
        return Code(name, kind)

    def token(self, index: str, shape, axes) -> Tok:
        """A token from its flat index; `shape` holds ints, or code for sizes read at run
        time."""
        idx = Code(index, "int")
        pos = []
        rem = index
        for i, size in enumerate(reversed(shape)):
            last = i == len(shape) - 1
            c = rem if last else f"({rem}) % ({self.text(size)})"
            pos.append(self.fresh(c, "int") if not last or len(shape) > 1 else idx)
            rem = f"({rem}) // ({self.text(size)})"
        return Tok(idx, tuple(reversed(pos)), tuple(shape), tuple(axes))

    def space_shape(self, space) -> tuple:
        """A space's sizes: ints, or code where they depend on sizes read at run time."""
        if not self.sizes:
            return self.bp.qshape if space is self.bp.checked.qspace else self.bp.kshape
        sc = _Scope(self.bp, {}, self.dependent)
        return tuple(self.expr(s, sc, {}) for s in space.sizes)

    def summary_sizes(self, bs) -> tuple:
        """A summary's axis sizes: ints, or code where they depend on sizes read at run
        time."""
        sc = _Scope(bs.owner, {}, self.dependent)
        return tuple(self.expr(ax.size, sc, {}) for ax in bs.summary.axes)

    @property
    def dependent(self) -> set[str]:
        if not hasattr(self, "_dependent"):
            self._dependent = size_dependent(self.bp, self.sizes)
        return self._dependent

    def lit(self, v) -> str:
        if isinstance(v, bool):
            return "True" if v else "False"
        if isinstance(v, int):
            return self.d.int_lit(v)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise UnsupportedError(f"non-finite constant {v} in a compiled expression")
            return repr(v)
        raise UnsupportedError(f"cannot compile a constant of type {type(v).__name__}")

    def text(self, v) -> str:
        if isinstance(v, Code):
            return v.text
        return self.lit(v)

    @staticmethod
    def kind(v) -> str:
        if isinstance(v, Code):
            return v.kind
        if isinstance(v, Tok):
            return "int"
        return "bool" if isinstance(v, bool) else "float" if isinstance(v, float) else "int"

    # -------------------------------------------------------------- predicate
    def predicate(self, ctx: dict) -> str:
        """The direct mask as one boolean expression name (semantics/rules.py)."""
        scopes: dict = {}

        def value(owner, rule):
            sc = scopes.setdefault(id(owner), _Scope(owner, ctx, self.dependent))
            with _located(rule.span):
                return self.bool_text(self.expr(rule.expr, sc, {}))

        out = rules.combine(self.bp.rules, value, _CodeDomain(self, ctx))
        return out if out.isidentifier() else self.fresh(out, "bool").text

    def summary_predicate(self, bs, ctx: dict) -> str:
        """One summary's attend rule for the query and region in ctx."""
        with _located(bs.summary.attend.span):
            return self.bool_text(self.expr(bs.summary.attend,
                                            _Scope(bs.owner, ctx, self.dependent), {}))

    def bias(self, ctx: dict) -> str | None:
        """The sum of bias terms (float), or None when the pattern has none."""
        terms = []
        envs = {}
        for own, sc, hr in self.bp.biases:
            sub = envs.setdefault(id(own), _Scope(own, ctx, self.dependent))
            v = self.expr(sc.expr, sub, {})
            with _located(sc.span):
                t = self.d.TO_FLOAT.format(self.text(v))
            if hr is not None:
                h = ctx["h"].text
                t = f"{self.d.where(f'(({h} >= {hr[0]}) & ({h} < {hr[1]}))', t, '0.0')}"
            terms.append(self.fresh(t, "float").text)
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else self.fresh(" + ".join(terms), "float").text

    def bool_text(self, v) -> str:
        if isinstance(v, tuple):
            raise UnsupportedError("a per-axis bool must be reduced with all() or any()")
        return self.text(v)

    # -------------------------------------------------------------- expressions
    def expr(self, e: ir.Expr, sc: _Scope, local: dict):
        with _located(e.span):
            if e.ty is not None and e.ty.static and not _mentions_local(e, local):
                v = sc.static(e)
                if v is not None:
                    return v
            return getattr(self, "e_" + type(e).__name__)(e, sc, local)

    def e_IntLit(self, e, sc, local):
        return e.value

    e_FloatLit = e_BoolLit = e_IntLit

    def e_Name(self, e, sc, local):
        if e.id in local:
            return local[e.id]
        if e.ref in ("q", "k", "h", "summary"):
            if e.ref not in sc.ctx:
                raise UnsupportedError(f"'{e.id}' has no value in a compiled kernel here",
                                       e.span)
            return sc.ctx[e.ref]
        if e.id in sc.owner.inputs and e.id in self.inputs:
            arr = self.inputs[e.id]
            if arr.scalar:
                return self.fresh(self.d.scalar(arr), arr.kind)
            return arr
        if e.ref == "param" and e.id in self.sizes:
            key = ("size", e.id)
            if key not in self.memo:
                self.memo[key] = self.fresh(self.d.scalar(self.inputs[e.id]), "int")
            return self.memo[key]
        if e.id in sc.env:
            return sc.env[e.id]
        if e.id in sc.lazy:
            key = (id(sc.owner), e.id)
            if key not in self.memo:
                self.memo[key] = self.materialise(self.expr(sc.lazy[e.id], sc, {}))
            return self.memo[key]
        if e.value is not None:  # a constant
            return Evaluator({}, {}).eval(e.value)
        raise UnsupportedError(f"'{e.id}' has no value in a compiled kernel", e.span)

    def materialise(self, v):
        if isinstance(v, tuple):
            return tuple(self.materialise(x) for x in v)
        if isinstance(v, Code) and not v.text.isidentifier():
            return self.fresh(v.text, v.kind)
        return v

    def e_TupleLit(self, e, sc, local):
        return tuple(self.expr(i, sc, local) for i in e.items)

    def num(self, v):
        return v.index if isinstance(v, Tok) else v

    def lift(self, f, *xs):
        if any(isinstance(x, tuple) for x in xs):
            n = max(len(x) for x in xs if isinstance(x, tuple))
            return tuple(self.lift(f, *[x[i] if isinstance(x, tuple) else x for x in xs])
                         for i in range(n))
        return f(*xs)

    def e_Unary(self, e, sc, local):
        x = self.num(self.expr(e.operand, sc, local))

        def f(a):
            if not isinstance(a, Code):
                return {"not": lambda: not a, "~": lambda: ~a, "-": lambda: -a}[e.op]()
            if e.op == "not":
                return self.fresh(self.d.NOT.format(a.text), "bool")
            if e.op == "~":
                return self.fresh(f"-({a.text}) - 1", "int")
            return self.fresh(f"-({a.text})", a.kind)
        return self.lift(f, x)

    def e_Binary(self, e, sc, local):
        op = e.op
        a = self.num(self.expr(e.left, sc, local))
        b = self.num(self.expr(e.right, sc, local))
        return self.lift(lambda x, y: self.binop(op, x, y, e.span), a, b)

    def binop(self, op, a, b, span):
        if not isinstance(a, Code) and not isinstance(b, Code):
            if op == "and":
                return a and b
            if op == "or":
                return a or b
            return eval_binop(op, a, b, span)
        ta, tb = self.text(a), self.text(b)
        kind = "float" if "float" in (self.kind(a), self.kind(b)) else "int"
        # identities on integer code (float code keeps its IEEE behaviour)
        if kind == "int" and isinstance(b, int) and not isinstance(b, bool):
            if (op in ("+", "-", "|", "^", "<<", ">>") and b == 0) or (
                    op in ("*", "//") and b == 1):
                return a
            if op == "%" and b == 1:
                return 0
            if op == "*" and b == 0:
                return 0
        if kind == "int" and isinstance(a, int) and not isinstance(a, bool):
            if (op in ("+", "|", "^") and a == 0) or (op == "*" and a == 1):
                return b
        if op in ("and", "or"):
            # constant folding of the short-circuit forms
            for x, y in ((a, b), (b, a)):
                if isinstance(x, bool):
                    if op == "and":
                        return y if x else False
                    return True if x else y
            return self.fresh(f"({ta}) {'&' if op == 'and' else '|'} ({tb})", "bool")
        if op in ("+", "-", "*"):
            return self.fresh(f"({ta}) {op} ({tb})", kind)
        if op == "/":
            return self.fresh(f"{self.d.TO_FLOAT.format(ta)} / ({tb})", "float")
        if op in ("//", "%"):
            if kind == "float":
                raise UnsupportedError("floor division and modulo of floats cannot be compiled",
                                       span)
            if isinstance(b, int) and b == 0:
                raise EvaluationError("division by zero" if op == "//" else "modulo by zero",
                                      span)
            return self.fresh((self.d.FDIV if op == "//" else self.d.FMOD).format(ta, tb),
                              "int")
        if op == "**":
            if isinstance(b, int) and b >= 0 and kind == "int":
                out = "1" if b == 0 else " * ".join([f"({ta})"] * b)
                return self.fresh(out, "int")
            if kind == "int" and a == 2 and isinstance(b, Code):
                return self.fresh(f"(1 << ({tb}))", "int")
            if isinstance(a, int | float) and not isinstance(a, bool) and a > 0 and (
                    math.isfinite(a)):  # c ** x = exp(ln(c) x) for a constant c > 0
                x = self.d.TO_FLOAT.format(tb)
                return self.fresh(self.d.EXP.format(f"{math.log(a)!r} * {x}"), "float")
            raise UnsupportedError("'**' with a run-time exponent cannot be compiled", span)
        if op in ("&", "|", "^", "<<", ">>"):
            return self.fresh(f"({ta}) {op} ({tb})", "int")
        raise UnsupportedError(f"operator '{op}' cannot be compiled", span)

    def e_Compare(self, e, sc, local):
        vals = [self.num(self.expr(o, sc, local)) for o in e.operands]
        out = None
        for i, op in enumerate(e.ops):
            r = self.lift(lambda x, y, op=op: self.compare(op, x, y), vals[i], vals[i + 1])
            out = r if out is None else self.lift(
                lambda x, y: self.binop("and", x, y, e.span), out, r)
        return out

    def compare(self, op, a, b):
        if not isinstance(a, Code) and not isinstance(b, Code):
            import operator as o
            return {"<": o.lt, "<=": o.le, ">": o.gt, ">=": o.ge, "==": o.eq,
                    "!=": o.ne}[op](a, b)
        return self.fresh(f"({self.text(a)}) {op} ({self.text(b)})", "bool")

    def e_IfExpr(self, e, sc, local):
        c = self.expr(e.cond, sc, local)
        if isinstance(c, bool):
            return self.num(self.expr(e.then if c else e.orelse, sc, local))
        a = self.num(self.expr(e.then, sc, local))
        b = self.num(self.expr(e.orelse, sc, local))

        def sel(cc, x, y):
            if isinstance(cc, bool):
                return x if cc else y
            kind = "float" if "float" in (self.kind(x), self.kind(y)) else self.kind(x)
            return self.fresh(self.d.where(self.text(cc), self.text(x), self.text(y)), kind)
        return self.lift(sel, c, a, b)

    def e_LetExpr(self, e, sc, local):
        inner = dict(local)
        inner[e.name] = self.materialise(self.expr(e.value, sc, local))
        return self.expr(e.body, sc, inner)

    def e_Index(self, e, sc, local):
        base = self.expr(e.base, sc, local)
        idx = self.num(self.expr(e.index, sc, local))
        if isinstance(base, tuple):
            if not isinstance(idx, int):
                raise UnsupportedError("a tuple index must be static in a compiled kernel",
                                       e.span)
            return base[idx]
        if isinstance(base, Arr):
            dims = sc.owner.inputs[base.name].dims
            if len(dims) == 1:
                return self.fresh(self.d.load(base, self.text(idx)), base.kind)
            if self.sizes and self._sized_dims(sc.owner, base.name):
                raise NeedsSizes("an input whose dimensions depend on the sizes")
            return Rows(base, idx, dims[1:])  # x[i, j, ...]: a flat offset
        if isinstance(base, Rows):
            off = self.binop("+", self.binop("*", base.offset, base.dims[0], e.span), idx,
                             e.span)
            if len(base.dims) == 1:
                return self.fresh(self.d.load(base.arr, self.text(off)), base.arr.kind)
            return Rows(base.arr, off, base.dims[1:])
        raise UnsupportedError("indexing this value cannot be compiled", e.span)

    def _sized_dims(self, owner, name: str) -> bool:
        """Does a dimension of input `name` depend on a size read at run time?"""
        dep = size_dependent(owner, self.sizes)
        decl = next(d for d in owner.checked.inputs if d.name == name)
        return any(n.id in dep for d in decl.dims if d is not None for n in names(d))

    def e_Attr(self, e, sc, local):
        base = self.expr(e.base, sc, local)
        if isinstance(base, SummaryCode):
            return base.coords[e.name]
        if not isinstance(base, Tok):
            raise UnsupportedError(f"'.{e.name}' cannot be compiled here", e.span)
        if e.name == "size" and any(isinstance(s, Code) for s in base.shape):
            out = base.shape[0]
            for s in base.shape[1:]:
                out = self.binop("*", out, s, e.span)
            return out
        return token_field(base, e.name)

    def e_Call(self, e, sc, local):
        if e.ref == "fn":
            inner = fn_locals(e, lambda a, loc: self.materialise(self.expr(a, sc, loc)),
                              local)
            return self.expr(e.body, sc, inner)
        if e.ref == "builtin":
            args = [self.num(self.expr(a, sc, local)) for a in e.args]
            return self.builtin(e.func, args, e.span)
        if e.ref == "pattern":
            return self.pattern_call(e, sc, local)
        if e.ref == "dynamic" and e.func == "chunk_topk" and self.dynamic is not None:
            return self.chunk_topk(e, sc, local)
        raise UnsupportedError(f"'{e.func}' depends on the q/k content and cannot be compiled "
                               "here", e.span)

    def chunk_topk(self, e, sc, local):
        """DHSA's selection, read from the run-time tables the wrapper computes on the
        device (semantics/dynamic.select): DYN_CHUNK maps each query to its block's row
        (the tail's queries to a last, empty row), DYN_KEEP[b, h, row, key]."""
        args = dict(zip(e.params, e.args))
        conf = {}
        for name, a in args.items():
            if name == "starts":
                conf["starts"] = a.id if isinstance(a, ir.Name) else None
                continue
            v = self.expr(a, sc, local)
            if not isinstance(v, int | bool):
                if self.sizes:
                    raise NeedsSizes("chunk_topk")
                raise UnsupportedError(f"chunk_topk's '{name}' must be static to compile")
            conf[name] = v
        if self.dynamic and self.dynamic != conf:
            raise UnsupportedError("a pattern can use only one chunk_topk selection")
        self.dynamic.update(conf)
        q = self.text(sc.ctx["q"].index)
        k = self.text(sc.ctx["k"].index)
        row = self.fresh(f"tl.load(DYN_CHUNK + tl.maximum({q}, 0))", "int").text
        keep = self.fresh(f"tl.load(DYN_KEEP + (bh * DYN_NB + {row}) * DYN_NC + "
                          f"tl.maximum({k}, 0))", "int")
        return self.fresh(f"({keep.text}) != 0", "bool")

    def pattern_call(self, e, sc, local):
        def value(a):
            v = self.expr(a, sc, local)
            if isinstance(v, Code | Tok):
                if self.sizes:
                    raise NeedsSizes("a pattern called with size-dependent arguments")
                raise UnsupportedError(f"pattern '{e.func}' is called with run-time arguments",
                                       e.span)
            return v
        sub = bind_cached(e.callee, call_values(e.callee, e, value))
        saved = self.bp
        self.bp = sub
        try:
            return Code(self.predicate(sc.ctx), "bool")
        finally:
            self.bp = saved

    def builtin(self, name, args, span):
        if not any(isinstance(a, Code) or (isinstance(a, tuple) and any(
                isinstance(x, Code) for x in a)) for a in args):
            return call_builtin(name, list(args), span)
        return BUILTIN_IMPLS[name](self, args, span)

    def one(self, fmt, args, kind=None):
        return self.lift(lambda x: self.fresh(fmt.format(self.text(x)), kind or self.kind(x)),
                         args[0])

    def minmax(self, name, items):
        out = items[0]
        for y in items[1:]:
            if not isinstance(out, Code) and not isinstance(y, Code):
                out = min(out, y) if name == "min" else max(out, y)
                continue
            fmt = self.d.MIN if name == "min" else self.d.MAX
            kind = "float" if "float" in (self.kind(out), self.kind(y)) else "int"
            out = self.fresh(fmt.format(self.text(out), self.text(y)), kind)
        return out

    def bits(self, name, x):
        """popcount / bit_length / ilog2 of a non-negative int64, unrolled."""
        t = self.text(x)
        if name == "popcount":
            v = self.fresh(f"({t}) - ((({t}) >> 1) & 0x5555555555555555)", "int").text
            v = self.fresh(f"(({v}) & 0x3333333333333333) + ((({v}) >> 2) & 0x3333333333333333)",
                           "int").text
            v = self.fresh(f"(({v}) + (({v}) >> 4)) & 0x0F0F0F0F0F0F0F0F", "int").text
            v = self.fresh(f"({v}) + (({v}) >> 8)", "int").text
            v = self.fresh(f"({v}) + (({v}) >> 16)", "int").text
            v = self.fresh(f"({v}) + (({v}) >> 32)", "int").text
            return self.fresh(f"({v}) & 127", "int")
        y = self.fresh(self.d.ABS.format(t), "int").text
        n = self.fresh(self.d.where(f"({y}) != 0", "1", "0"), "int").text
        for s in (32, 16, 8, 4, 2, 1):
            hi = self.fresh(f"({y}) >> {s}", "int").text
            n = self.fresh(f"({n}) + {self.d.where(f'({hi}) != 0', str(s), '0')}", "int").text
            y = self.fresh(self.d.where(f"({hi}) != 0", hi, y), "int").text
        out = Code(n, "int")
        if name == "ilog2":
            out = self.fresh(f"({n}) - 1", "int")
        return out


class _CodeDomain:
    """rules.combine over generated boolean expressions."""

    def __init__(self, em: Emitter, ctx: dict):
        self.em = em
        self.h = ctx.get("h")

    def false(self):
        return "False"

    def union(self, a, b):
        return f"({a}) | ({b})"

    def intersect(self, a, b):
        return f"({a}) & ({b})"

    def minus(self, a, b):
        return f"({a}) & {self.em.d.NOT.format(b)}"

    def in_heads(self, lo, hi):
        return f"(({self.h.text} >= {lo}) & ({self.h.text} < {hi}))"

    def not_in_heads(self, lo, hi):
        return self.em.d.NOT.format(self.in_heads(lo, hi))


def _b_minmax(name):
    def impl(em, args, span):
        if len(args) == 1 and isinstance(args[0], tuple):
            return em.minmax(name, list(args[0]))
        return em.lift(lambda *xs: em.minmax(name, list(xs)), *args)
    return impl


def _b_reduce(name):
    op = {"all": "and", "any": "or", "sum": "+", "prod": "*"}[name]

    def impl(em, args, span):
        return fold(args[0], lambda a, b: em.binop(op, a, b, span))
    return impl


def _b_float_fn(attr):
    def impl(em, args, span):
        fmt = getattr(em.d, attr)
        return em.lift(lambda x: em.fresh(fmt.format(em.d.TO_FLOAT.format(em.text(x))),
                                          "float"), args[0])
    return impl


# One entry per built-in of lang/builtins.BUILTINS (tests/test_architecture.py checks that
# none is missing): f(emitter, args, span) -> generated value; each dialect spells the
# operators (Dialect subclasses above).
BUILTIN_IMPLS = {
    "abs": lambda em, args, span: em.one(em.d.ABS, args),
    "min": _b_minmax("min"),
    "max": _b_minmax("max"),
    "clamp": lambda em, args, span: em.lift(lambda x, lo, hi: em.minmax(
        "min", [em.minmax("max", [x, lo]), hi]), *args),
    "cdiv": lambda em, args, span: em.lift(lambda a, b: em.binop(
        "-", 0, em.binop("//", em.binop("-", 0, a, span), b, span), span), *args),
    "popcount": lambda em, args, span: em.lift(lambda x: em.bits("popcount", x), args[0]),
    "bit_length": lambda em, args, span: em.lift(lambda x: em.bits("bit_length", x),
                                                 args[0]),
    "ilog2": lambda em, args, span: em.lift(lambda x: em.bits("ilog2", x), args[0]),
    "is_pow2": lambda em, args, span: em.lift(lambda x: em.fresh(
        f"(({em.text(x)}) > 0) & ((({em.text(x)}) & (({em.text(x)}) - 1)) == 0)", "bool"),
        args[0]),
    "all": _b_reduce("all"),
    "any": _b_reduce("any"),
    "sum": _b_reduce("sum"),
    "prod": _b_reduce("prod"),
    "float": lambda em, args, span: em.one(em.d.TO_FLOAT, args, "float"),
    "floor": lambda em, args, span: em.lift(lambda x: x if em.kind(x) == "int" else em.fresh(
        em.d.FLOOR.format(em.text(x)), "int"), args[0]),
    "sqrt": _b_float_fn("SQRT"),
    "exp": _b_float_fn("EXP"),
    "log": _b_float_fn("LOG"),
    "tanh": _b_float_fn("TANH"),
}


class _Scope:
    """One owner pattern's values while emitting its rules; the names in `dynamic` (sizes
    read at run time and what depends on them) are emitted as code, never folded."""

    def __init__(self, owner: BoundPattern, ctx: dict, dynamic=frozenset()):
        self.owner = owner
        self.ctx = ctx
        self.env = {n: v for n, v in owner.env.items() if n not in dynamic}
        self.lazy = dict(owner.lazy_lets)
        self.lazy.update({let.name: let.value for let in owner.checked.lets
                          if let.name in dynamic})
        self.ev = Evaluator(dict(self.env), {})

    def static(self, e):
        """The value of a static expression, or None where only code can say (q.shape and
        the like read the token, which the static evaluator has not)."""
        try:
            v = self.ev.eval(e)
        except (EvaluationError, KeyError, AttributeError, TypeError):
            return None
        return v if isinstance(v, tuple | int | float | bool) else None


def _mentions_local(e, local) -> bool:
    """Static-typed expressions may still name a local bound to generated code."""
    return bool(local) and any(n.id in local for n in names(e))

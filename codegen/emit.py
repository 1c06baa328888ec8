"""Typed IR expressions -> straight-line code, for Triton kernels or PyTorch mask_mods.

Everything static (parameters, constants, static lets) is folded to a literal by the
reference evaluator, so the generated code holds only what depends on q, k, h or run-time
inputs. Integer semantics follow the language (floor division, non-negative modulo), via
helpers the generated module defines. Nothing from the .attn text is pasted into the code:
only numbers, operators chosen from fixed tables, and names this module invents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attndsl import ir
from attndsl.bind import BoundPattern, _Hooks, bind_def
from attndsl.errors import EvaluationError, UnsupportedError
from attndsl.evaluate import Evaluator, fn_locals


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
    """A run-time input array: loads through a pointer argument."""

    name: str
    length: int
    kind: str


class Dialect:
    """Operator spellings shared by both targets; subclasses differ where the APIs do."""

    def where(self, c, a, b):
        return f"{self.NS}.where({c}, {a}, {b})"


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

    def load(self, arr, idx):
        return (f"tl.load({arr.name} + tl.minimum(tl.maximum({idx}, 0), {arr.length - 1}))")

    def scalar_input(self, name):
        return name


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
        return f"{arr.name}[torch.clamp({idx}, 0, {arr.length - 1})]"


TRITON_HELPERS = '''
@triton.jit
def _fdiv(a, b):
    """Python's floor division on integers."""
    b = tl.where(b == 0, 1, b)
    q = a // b
    return q - ((a % b != 0) & ((a < 0) != (b < 0))).to(q.dtype)


@triton.jit
def _fmod(a, b):
    """Python's modulo: the result has the divisor's sign."""
    b = tl.where(b == 0, 1, b)
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _not(x):
    return x == 0


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
'''

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

    def __init__(self, bp: BoundPattern, dialect: Dialect, arrays: dict[str, Arr],
                 scalars: dict[str, str]):
        self.bp = bp
        self.d = dialect
        self.arrays = arrays  # input name -> Arr (pointer argument)
        self.scalars = scalars  # scalar input name -> argument name
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
        idx = Code(index, "int")
        pos = []
        rem = index
        for i, size in enumerate(reversed(shape)):
            last = i == len(shape) - 1
            c = rem if last else f"({rem}) % {size}"
            pos.append(self.fresh(c, "int") if not last or len(shape) > 1 else idx)
            rem = f"({rem}) // {size}"
        return Tok(idx, tuple(reversed(pos)), tuple(shape), tuple(axes))

    def lit(self, v) -> str:
        if isinstance(v, bool):
            return "True" if v else "False"
        if isinstance(v, int):
            return str(v)
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
    def predicate(self, ctx: dict, owner: BoundPattern | None = None) -> str:
        """The direct mask as one boolean expression name (rules combined as in bind.py)."""
        attend = within = exclude = None
        envs = {}
        for own, rule, hr in self.bp.rules:
            sub = envs.setdefault(id(own), _Scope(own, ctx))
            val = self.bool_text(self.expr(rule.expr, sub, {}))
            if hr is not None:
                inside = f"(({ctx['h'].text} >= {hr[0]}) & ({ctx['h'].text} < {hr[1]}))"
                val = (f"(({val}) | {self.d.NOT.format(inside)})" if rule.kind == "within"
                       else f"(({val}) & {inside})")
            if rule.kind == "attend":
                attend = val if attend is None else f"({attend}) | ({val})"
            elif rule.kind == "within":
                within = val if within is None else f"({within}) & ({val})"
            else:
                exclude = val if exclude is None else f"({exclude}) | ({val})"
        out = attend or "False"
        if within is not None:
            out = f"({out}) & ({within})"
        if exclude is not None:
            out = f"({out}) & {self.d.NOT.format(exclude)}"
        return self.fresh(out, "bool").text

    def summary_predicate(self, bs, ctx: dict) -> str:
        """One summary's attend rule for the query and region in ctx."""
        return self.bool_text(self.expr(bs.summary.attend, _Scope(bs.owner, ctx), {}))

    def bias(self, ctx: dict) -> str | None:
        """The sum of bias terms (float), or None when the pattern has none."""
        terms = []
        envs = {}
        for own, sc, hr in self.bp.scores:
            if sc.kind != "bias":
                continue
            sub = envs.setdefault(id(own), _Scope(own, ctx))
            v = self.expr(sc.expr, sub, {})
            t = self.d.TO_FLOAT.format(self.text(v))
            if hr is not None:
                h = ctx["h"].text
                t = f"{self.d.where(f'(({h} >= {hr[0]}) & ({h} < {hr[1]}))', t, '0.0')}"
            terms.append(self.fresh(t, "float").text)
        if not terms:
            return None
        return self.fresh(" + ".join(terms), "float").text

    def bool_text(self, v) -> str:
        if isinstance(v, tuple):
            raise UnsupportedError("a per-axis bool must be reduced with all() or any()")
        return self.text(v)

    # -------------------------------------------------------------- expressions
    def expr(self, e: ir.Expr, sc: _Scope, local: dict):
        if e.ty is not None and e.ty.static and not _mentions_local(e, local):
            try:
                return sc.static(e)
            except Exception:  # noqa: BLE001 - q.shape and the like: the code path decides
                pass
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
        if e.id in sc.owner.inputs:
            if e.id in self.arrays:
                return self.arrays[e.id]
            if e.id in self.scalars:
                kind = sc.owner.inputs[e.id][0]
                return Code(self.scalars[e.id], kind)
        if e.id in sc.owner.env:
            return sc.owner.env[e.id]
        if e.id in sc.lazy:
            key = (id(sc.owner), e.id)
            if key not in self.memo:
                self.memo[key] = self.materialise(self.expr(sc.lazy[e.id], sc, {}))
            return self.memo[key]
        if e.ref and e.ref.startswith("const"):
            return _Hooks(sc.owner).const(e.id, e.ref[6:] or None)
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
            from attndsl.evaluate import binop as pyop
            if op == "and":
                return a and b
            if op == "or":
                return a or b
            return pyop(op, a, b, span)
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
            if a == 2 and isinstance(b, Code):
                return self.fresh(f"(1 << ({tb}))", "int")
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
            return self.fresh(self.d.load(base, self.text(idx)), base.kind)
        raise UnsupportedError("indexing this value cannot be compiled", e.span)

    def e_Attr(self, e, sc, local):
        base = self.expr(e.base, sc, local)
        if isinstance(base, SummaryCode):
            return base.coords[e.name]
        if not isinstance(base, Tok):
            raise UnsupportedError(f"'.{e.name}' cannot be compiled here", e.span)
        if e.name == "pos":
            return base.pos
        if e.name == "shape":
            return base.shape
        if e.name == "size":
            return math.prod(base.shape)
        if e.name == "index":
            return base.index
        return base.pos[base.axes.index(e.name)]

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
        """DHSA's selection, read from the run-time table the wrapper computes on the device:
        keep[b, h, query block, chunk] and chunk_of[key]."""
        args = dict(zip(e.params, e.args))
        conf = {}
        for name in ("block", "chunk", "topk"):
            v = self.expr(args[name], sc, local)
            if not isinstance(v, int):
                raise UnsupportedError(f"chunk_topk's '{name}' must be static to compile")
            conf[name] = v
        starts = args.get("starts")
        conf["starts"] = starts.id if isinstance(starts, ir.Name) else None
        if self.dynamic and self.dynamic != conf:
            raise UnsupportedError("a pattern can use only one chunk_topk selection")
        self.dynamic.update(conf)
        q = self.text(sc.ctx["q"].index)
        k = self.text(sc.ctx["k"].index)
        qb = self.fresh(f"tl.maximum({q}, 0) // {conf['block']}", "int").text
        cid = self.fresh(f"tl.load(dyn_chunk_of + tl.maximum({k}, 0))", "int").text
        keep = self.fresh(f"tl.load(dyn_keep + (bh * dyn_nb + {qb}) * dyn_nc + {cid})", "int")
        return self.fresh(f"({keep.text}) != 0", "bool")

    def pattern_call(self, e, sc, local):
        pdef = sc.owner.module.scope[e.func]
        values = {}
        for p, a in zip(pdef.params, e.args):
            values[p.name] = self.expr(a, sc, local)
        for kw in e.kwargs:
            values[kw.name] = self.expr(kw.value, sc, local)
        if any(isinstance(v, Code | Tok) for v in values.values()):
            raise UnsupportedError(f"pattern '{e.func}' is called with run-time arguments",
                                   e.span)
        sub = bind_def(sc.owner.module.home(pdef), pdef, values, e.span)
        saved = self.bp
        self.bp = sub
        try:
            return Code(self.predicate(sc.ctx), "bool")
        finally:
            self.bp = saved

    def builtin(self, name, args, span):
        if not any(isinstance(a, Code) or (isinstance(a, tuple) and any(
                isinstance(x, Code) for x in a)) for a in args):
            from attndsl.evaluate import call_builtin
            return call_builtin(name, list(args), span)
        d = self.d

        def one(fmt, kind=None):
            return self.lift(lambda x: self.fresh(fmt.format(self.text(x)),
                                                  kind or self.kind(x)), args[0])

        if name == "abs":
            return one(d.ABS)
        if name in ("min", "max"):
            items = list(args[0]) if len(args) == 1 and isinstance(args[0], tuple) else None
            if items is None:
                return self.lift(lambda *xs: self.minmax(name, list(xs)), *args)
            return self.minmax(name, items)
        if name == "clamp":
            return self.lift(lambda x, lo, hi: self.minmax(
                "min", [self.minmax("max", [x, lo]), hi]), *args)
        if name == "cdiv":
            return self.lift(lambda a, b: self.binop(
                "-", 0, self.binop("//", self.binop("-", 0, a, span), b, span), span), *args)
        if name in ("all", "any", "sum", "prod"):
            x = args[0]
            if not isinstance(x, tuple):
                return x
            op = {"all": "and", "any": "or", "sum": "+", "prod": "*"}[name]
            out = x[0]
            for y in x[1:]:
                out = self.binop(op, out, y, span)
            return out
        if name == "is_pow2":
            return self.lift(lambda x: self.fresh(
                f"(({self.text(x)}) > 0) & ((({self.text(x)}) & (({self.text(x)}) - 1)) == 0)",
                "bool"), args[0])
        if name in ("popcount", "bit_length", "ilog2"):
            return self.lift(lambda x: self.bits(name, x), args[0])
        if name == "float":
            return one(d.TO_FLOAT, "float")
        if name == "floor":
            return self.lift(lambda x: x if self.kind(x) == "int" else self.fresh(
                d.FLOOR.format(self.text(x)), "int"), args[0])
        if name in ("sqrt", "exp", "log", "tanh"):
            fmt = {"sqrt": d.SQRT, "exp": d.EXP, "log": d.LOG, "tanh": d.TANH}[name]
            return self.lift(lambda x: self.fresh(fmt.format(d.TO_FLOAT.format(self.text(x))),
                                                  "float"), args[0])
        raise UnsupportedError(f"built-in '{name}' cannot be compiled", span)

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


class _Scope:
    """One owner pattern's values while emitting its rules."""

    def __init__(self, owner: BoundPattern, ctx: dict):
        self.owner = owner
        self.ctx = ctx
        self.lazy = owner.lazy_lets()
        self.ev = Evaluator(owner.env, {}, _Hooks(owner))

    def static(self, e):
        v = self.ev.eval(e)
        if isinstance(v, tuple | int | float | bool):
            return v
        raise UnsupportedError("static value of an unsupported kind")


def _mentions_local(e, local) -> bool:
    """Static-typed expressions may still name a local bound to generated code."""
    if not local:
        return False
    import dataclasses
    if isinstance(e, ir.Name):
        return e.id in local
    for f in dataclasses.fields(e):
        v = getattr(e, f.name)
        if isinstance(v, ir.Expr) and _mentions_local(v, local):
            return True
        if isinstance(v, tuple):
            for x in v:
                if isinstance(x, ir.Expr) and _mentions_local(x, local):
                    return True
                if isinstance(x, ir.Keyword) and _mentions_local(x.value, local):
                    return True
    return False

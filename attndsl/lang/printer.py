"""Printing: expressions back to .attn syntax, and the typed IR of a pattern as a tree."""

from __future__ import annotations

from pathlib import Path

from attndsl.lang import ir


def expr_source(e: ir.Expr) -> str:
    """Source text for an expression (see ir.source)."""
    return ir.source(e)


def _ty(e) -> str:
    return str(e.ty) + ("" if e.ty is None or not e.ty.static else " static") \
        if getattr(e, "ty", None) is not None else "?"


def expr_tree(e: ir.Expr, indent: int = 0, seen_fns: set | None = None) -> list[str]:
    """One line per node: the node, its type; function bodies once per pattern."""
    seen_fns = set() if seen_fns is None else seen_fns
    pad = "  " * indent
    at = f"@{Path(e.span.file).name}:{e.span.line}:{e.span.col}"
    if isinstance(e, ir.IntLit | ir.FloatLit | ir.BoolLit):
        return [f"{pad}{expr_source(e)} : {_ty(e)} {at}"]
    if isinstance(e, ir.Name):
        return [f"{pad}{e.ref or '?'} {e.id} : {_ty(e)} {at}"]
    head = {ir.TupleLit: "tuple", ir.IfExpr: "if", ir.Index: "index"}.get(type(e))
    kids: list = []
    if isinstance(e, ir.Unary):
        head, kids = f"unary {e.op}", [e.operand]
    elif isinstance(e, ir.Binary):
        head, kids = f"binary {e.op}", [e.left, e.right]
    elif isinstance(e, ir.Compare):
        head, kids = f"compare {' '.join(e.ops)}", list(e.operands)
    elif isinstance(e, ir.TupleLit):
        kids = list(e.items)
    elif isinstance(e, ir.IfExpr):
        kids = [e.cond, e.then, e.orelse]
    elif isinstance(e, ir.LetExpr):
        head, kids = f"let {e.name}", [e.value, e.body]
    elif isinstance(e, ir.Index):
        kids = [e.base, e.index]
    elif isinstance(e, ir.Attr):
        head, kids = f"attr .{e.name}", [e.base]
    elif isinstance(e, ir.Call):
        head = f"call {e.ref or '?'} {e.func}"
        kids = list(e.args) + [k.value for k in e.kwargs]
        if e.params:
            head += "(" + ", ".join(e.params) + ")"
    lines = [f"{pad}{head} : {_ty(e)} {at}"]
    for k in kids:
        lines += expr_tree(k, indent + 1, seen_fns)
    if isinstance(e, ir.Call) and e.body is not None:
        key = (e.func, tuple(str(a.ty) for a in e.args))
        if key in seen_fns:
            lines.append(f"{pad}  body: (as above)")
        else:
            seen_fns.add(key)
            lines.append(f"{pad}  body:")
            lines += expr_tree(e.body, indent + 2, seen_fns)
    return lines


def pattern_tree(cp: ir.CheckedPattern) -> str:
    """The typed IR of a checked pattern, stable enough for golden files."""
    seen: set = set()
    out = []
    params = ", ".join(f"{p.name}: {t}" + (f" = {expr_source(p.default)}" if p.default
                                           else "") for p, t in cp.params)
    out.append(f"pattern {cp.name}({params})")
    for role, sp in (("query", cp.qspace), ("key", cp.kspace)):
        if sp is not None:
            sizes = ", ".join(expr_source(s) for s in sp.sizes)
            out.append(f"  {role} space {sp.kind}({sizes}) axes ({', '.join(sp.axes)})")
    if cp.heads is not None:
        out.append(f"  heads {expr_source(cp.heads)}")
    for d in cp.inputs:
        dims = ", ".join("*" if x is None else expr_source(x) for x in d.dims)
        out.append(f"  input {d.name}: {d.kind}" + (f"[{dims}]" if d.dims else "")
                   + (" optional" if d.optional else ""))
    for r in cp.requires:
        out.append(f"  require {r.message!r}")
        out += expr_tree(r.cond, 2, seen)
    for let in cp.lets:
        out.append(f"  let {let.name}")
        out += expr_tree(let.value, 2, seen)
    for r in cp.rules:
        hr = f" on heads {expr_source(r.heads.lo)}..{expr_source(r.heads.hi)}" if r.heads \
            else ""
        out.append(f"  {r.kind}{hr}")
        out += expr_tree(r.expr, 2, seen)
    for s in cp.scores:
        hr = f" on heads {expr_source(s.heads.lo)}..{expr_source(s.heads.hi)}" if s.heads \
            else ""
        out.append(f"  {s.kind}{hr}")
        out += expr_tree(s.expr, 2, seen)
    for s in cp.summaries:
        axes = ", ".join(f"{a.name}: {expr_source(a.size)}"
                         + (f" = {expr_source(a.bound)}" if a.bound is not None else "")
                         for a in s.axes)
        keys = f"from {s.keys_from}" if s.keys_from else s.keys
        values = f"from {s.values_from}" if s.values_from else s.values
        queries = f"at {expr_source(s.queries_at)}" if s.queries_at is not None else s.queries
        out.append(f"  summary {s.name}({axes}) keys {keys} values {values}"
                   + (f" queries {queries}" if s.values == "expectation" else ""))
        if s.member is not None:
            out.append("    member")
            out += expr_tree(s.member, 3, seen)
        out.append("    attend")
        out += expr_tree(s.attend, 3, seen)
        if s.bias is not None:
            out.append("    bias")
            out += expr_tree(s.bias, 3, seen)
    if cp.nnz is not None:
        out.append("  nnz" + (f" when {expr_source(cp.nnz.when)}" if cp.nnz.when else ""))
        out += expr_tree(cp.nnz.expr, 2, seen)
    if cp.route is not None:
        r = cp.route
        opts = "".join(f" {what} {expr_source(x)}" for what, x in (
            ("scaled", r.scaled), ("hard", r.hard), ("weighted", r.weighted),
            ("grouped", r.grouped)) if x is not None)
        out.append(f"  route {r.input} top {expr_source(r.top)} shared "
                   f"{expr_source(r.shared)}{opts}")
    for name, ref in cp.average:
        args = ", ".join([expr_source(a) for a in ref.args]
                         + [f"{k.name} = {expr_source(k.value)}" for k in ref.kwargs])
        out.append(f"  average part {name}({args})")
    for ref in cp.includes:
        args = ", ".join(expr_source(a) for a in ref.args)
        out.append(f"  include {ref.name}({args})")
    return "\n".join(out) + "\n"

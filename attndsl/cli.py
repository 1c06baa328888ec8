"""The `attndsl` command line: check, list, mask, show."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import ir
from .errors import AttnError, ParameterError


def parse_value(text: str):
    """`7` -> 7, `7,9` or `(7,9)` -> (7, 9), `true` -> True, `1.5` -> 1.5."""
    t = text.strip()
    if t.startswith("(") and t.endswith(")"):
        t = t[1:-1]
    if "," in t:
        return tuple(parse_value(x) for x in t.split(",") if x.strip())
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(t, 0)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        raise ParameterError(f"cannot read value '{text}': expected an integer, a number, "
                             "true/false, or a comma-separated tuple") from None


def _sets(pairs) -> dict:
    out = {}
    for p in pairs or ():
        if "=" not in p:
            raise ParameterError(f"--set takes NAME=VALUE, not '{p}'")
        k, v = p.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def _inputs(pairs) -> dict:
    import numpy as np
    import torch
    out = {}
    for p in pairs or ():
        if "=" not in p:
            raise ParameterError(f"--input takes NAME=VALUE, not '{p}'")
        k, v = p.split("=", 1)
        if v.startswith("@"):
            try:
                arr = np.load(v[1:])
            except (OSError, ValueError) as e:
                raise ParameterError(f"cannot load input '{k}' from '{v[1:]}': {e}") from None
            out[k] = torch.as_tensor(arr)
        else:
            val = parse_value(v)
            out[k] = torch.tensor(val if isinstance(val, tuple) else val)
    return out


def _compile(args):
    from .api import compile as compile_op
    return compile_op(args.file, pattern=args.pattern, **_sets(args.set))


def _content(op, args):
    """Random q, k for patterns whose mask depends on content (seeded, reproducible)."""
    import torch
    if not op.bound.content_dependent:
        return {}
    g = torch.Generator().manual_seed(args.seed)
    heads = op.heads or 1
    q = torch.randn(1, heads, op.bound.nq, args.dim, generator=g)
    k = torch.randn(1, heads, op.bound.nk, args.dim, generator=g)
    return {"q": q, "k": k}


def cmd_check(args) -> int:
    from .api import load
    from .bind import bind
    from .checker import check_module
    failed = False
    for f in args.files:
        try:
            module = load(f)
            checked = check_module(module)
            defaults_ok = 0
            for cp in checked.values():
                if all(p.default is not None for p, _ in cp.params):
                    bind(cp, module, {})
                    defaults_ok += 1
            n = len(checked)
            print(f"{f}: ok ({n} pattern{'s' if n != 1 else ''}"
                  + (f", {defaults_ok} checked with default parameters" if defaults_ok else "")
                  + ")")
        except AttnError as e:
            failed = True
            print(e.render(), file=sys.stderr)
    return 1 if failed else 0


def _type_str(p: ir.Param) -> str:
    t = p.type
    return t.name if t.dims is None else f"{t.name}[{', '.join(_src(d) for d in t.dims)}]"


def _src(e) -> str:
    from .printer import expr_source
    return "*" if e is None else expr_source(e)


def cmd_list(args) -> int:
    from .api import load
    from .checker import check_module
    module = load(args.file)
    checked = check_module(module)
    for p in module.patterns():
        cp = checked[p.name]
        params = ", ".join(
            f"{x.name}: {_type_str(x)}" + (f" = {_src(x.default)}" if x.default else "")
            for x in p.params)
        print(f"pattern {p.name}({params})")
        if cp.inputs:
            for d in cp.inputs:
                dims = "" if not d.dims else "[" + ", ".join(_src(x) for x in d.dims) + "]"
                print(f"    input {d.name}: {d.kind}{dims}" + (" optional" if d.optional
                                                               else ""))
        for line in (p.doc or "(no doc comment)").splitlines():
            print(f"    {line}")
        print()
    return 0


def cmd_mask(args) -> int:
    import numpy as np
    op = _compile(args)
    m = op.mask(**_content(op, args), **_inputs(args.input))
    np.save(args.output, m.cpu().numpy())
    print(f"wrote {args.output}: bool {list(m.shape)}, {int(m.sum()):,} attended pairs "
          f"({float(m.float().mean()):.4%} dense)")
    return 0


def cmd_show(args) -> int:
    from . import render
    op = _compile(args)
    inputs = _inputs(args.input)
    m = op.mask(**_content(op, args), **inputs)
    query = parse_value(args.query) if args.query is not None else None
    if args.output:
        render.plot(op, m, args.output, query)
        print(f"wrote {args.output}")
    else:
        print(render.text(op, m, query, width=args.width))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attndsl", description="Compile and inspect attention "
                                 "patterns written in .attn files.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="parse, type-check and check default constraints")
    c.add_argument("files", nargs="+")
    c.set_defaults(func=cmd_check)
    c = sub.add_parser("list", help="patterns, parameters, defaults and doc comments")
    c.add_argument("file")
    c.set_defaults(func=cmd_list)

    def common(c):
        c.add_argument("file")
        c.add_argument("-p", "--pattern", help="pattern name (optional if the file has one)")
        c.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help="parameter value: 7, 7,9 (per axis), true, 1.5")
        c.add_argument("--input", action="append", metavar="NAME=VALUE",
                       help="run-time input: a value, a comma list, or @file.npy")
        c.add_argument("--seed", type=int, default=0,
                       help="seed of the random q, k for content-dependent patterns")
        c.add_argument("--dim", type=int, default=16,
                       help="head dim of the random q, k for content-dependent patterns")
    c = sub.add_parser("mask", help="write the dense boolean mask as .npy")
    common(c)
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=cmd_mask)
    c = sub.add_parser("show", help="draw the mask (text, or PNG with -o)")
    common(c)
    c.add_argument("-o", "--output", help="PNG file; without it, text in the terminal")
    c.add_argument("--query", help="query to highlight: flat index or coordinates like 3,4")
    c.add_argument("--width", type=int, default=64, help="text width in cells")
    c.set_defaults(func=cmd_show)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AttnError as e:
        print(e.render(), file=sys.stderr)
        return 1
    except BrokenPipeError:  # pragma: no cover - e.g. `attndsl list x | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main", "parse_value", "Path"]

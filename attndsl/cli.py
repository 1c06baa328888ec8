"""The `attndsl` command line: check, list, mask, show, analyze, compare, compile, bench,
cp-plan, eval."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from attndsl.errors import AttnError, ParameterError
from attndsl.lang import ir


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


def _value(option: str, name: str, text: str):
    """parse_value, with the option and the name in the error."""
    try:
        return parse_value(text)
    except ParameterError as e:
        raise ParameterError(f"{option} {name}={text}: {e.message}") from None


def _sets(pairs) -> dict:
    out = {}
    for p in pairs or ():
        if "=" not in p:
            raise ParameterError(f"--set takes NAME=VALUE, not '{p}'")
        k, v = p.split("=", 1)
        out[k.strip()] = _value("--set", k.strip(), v)
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
            except (OSError, ValueError, EOFError) as e:
                raise ParameterError(f"cannot load input '{k}' from '{v[1:]}': {e}") from None
            out[k] = torch.as_tensor(arr)
        else:
            val = _value("--input", k, v)
            out[k] = torch.tensor(val if isinstance(val, tuple) else val)
    return out


def _compile(args):
    from attndsl.api import compile as compile_op
    return compile_op(Path(args.file), pattern=args.pattern, import_roots=_roots(args),
                      **_sets(args.set))


def _roots(args) -> list[str]:
    return list(getattr(args, "import_root", None) or ())


def _load(file: str, args):
    """The module of a file the user named (always a file, whatever its name)."""
    from attndsl.api import load
    return load(Path(file), import_roots=_roots(args))


def _content(op, args):
    """Random q, k for patterns whose mask depends on content (seeded, reproducible)."""
    import torch
    if not op.bound.content_dependent:
        return {}
    if args.dim < 1:
        raise ParameterError(f"--dim must be at least 1, not {args.dim}")
    g = torch.Generator().manual_seed(args.seed)
    heads = op.heads or 1
    q = torch.randn(1, heads, op.bound.nq, args.dim, generator=g)
    k = torch.randn(1, heads, op.bound.nk, args.dim, generator=g)
    return {"q": q, "k": k}


def cmd_check(args) -> int:
    from attndsl.lang.checker import check_module
    from attndsl.semantics.bind import bind
    failed = False
    for f in args.files:
        try:
            module = _load(f, args)
            if not module.items:
                raise AttnError(f"'{f}' defines nothing: no pattern, fn, const or import "
                                "(an empty file?)")
            checked = check_module(module)
            defaults_ok = 0
            for cp in checked.values():
                if all(p.default is not None for p, _ in cp.params):
                    bind(cp, {})
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
    from attndsl.lang.printer import expr_source
    return "*" if e is None else expr_source(e)


def cmd_list(args) -> int:
    from attndsl.lang.checker import check_module
    module = _load(args.file, args)
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
    with open(args.output, "wb") as out:  # np.save(path) would append '.npy' to other names
        np.save(out, m.cpu().numpy())
    print(f"wrote {args.output}: bool {list(m.shape)}, {int(m.sum()):,} attended pairs "
          f"({float(m.float().mean()):.4%} dense)")
    return 0


def cmd_show(args) -> int:
    from attndsl import render
    if args.width < 2:
        raise ParameterError(f"--width must be at least 2, not {args.width}")
    op = _compile(args)
    inputs = _inputs(args.input)
    m = op.mask(**_content(op, args), **inputs)
    query = parse_value(args.query) if args.query is not None else None
    if args.output:
        reach = op.reach(**_content(op, args), **inputs) if op.summaries(**inputs) else None
        render.plot(op, m, args.output, query, reach)
        print(f"wrote {args.output}")
    else:
        print(render.text(op, m, query, width=args.width))
    return 0


def cmd_analyze(args) -> int:
    import json

    from attndsl.report import analysis_table
    op = _compile(args)
    content = _content(op, args)
    inputs = _inputs(args.input)
    query = parse_value(args.query) if args.query is not None else None
    a = op.analyze(args.layers, query, head_dim=args.head_dim, q=content.get("q"),
                   k=content.get("k"), progress=False if args.json else None,
                   keep_sets=bool(args.plot), **inputs)
    p = op.path(*(parse_value(x) for x in args.path), **content, **inputs) if args.path \
        else None
    if args.json:
        out = a.to_json()
        if p is not None:
            out["path"] = {"source": p.source, "target": p.target,
                           "tokens": list(p.tokens) if p.tokens else None, "hops": p.hops,
                           "engine": p.engine}
        print(json.dumps(out, indent=2))
    else:
        print(analysis_table(a))
        if p is not None:
            print(f"shortest path ({p.engine}): {p.describe(op.query_shape)}")
    if args.plot:
        from attndsl import render
        render.plot_reach(op, a, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def cmd_compare(args) -> int:
    from attndsl.api import compile as compile_op
    from attndsl.errors import AttnNameError, did_you_mean
    sets = _sets(args.set)
    inputs = _inputs(args.input)
    used, used_inputs = set(), set()
    results = []
    for spec in args.patterns:
        file, _, name = spec.partition(":")
        probe = _load(file, args)
        own = [p.name for p in probe.patterns()]
        names = [name] if name else list(args.pattern) if args.pattern else own
        for n in names:
            pdef = probe.scope.get(n)
            if not isinstance(pdef, ir.PatternDef):
                raise AttnNameError(f"'{file}' has no pattern '{n}'" + did_you_mean(n, own))
            mine = {k: v for k, v in sets.items() if k in {p.name for p in pdef.params}}
            used |= set(mine)
            op = compile_op(Path(file), pattern=n, import_roots=_roots(args), **mine)
            run = {k: v for k, v in inputs.items() if k in op.inputs}
            used_inputs |= set(run)
            content = _content(op, args)
            results.append((op, op.analyze(args.layers, q=content.get("q"), k=content.get("k"),
                                           **run)))
    for what, given, taken in (("parameter", sets, used), ("run-time input", inputs,
                                                           used_inputs)):
        unused = set(given) - taken
        if unused:
            raise ParameterError(f"no compared pattern has {what}"
                                 f"{'s' if len(unused) > 1 else ''} "
                                 + ", ".join(sorted(unused)))
    from attndsl.report import COVERAGE_NOTE, coverage_text
    head = f"{'pattern':<28}" + "".join(f"{'L' + str(i):>8}" for i in range(1, args.layers + 1))
    print("fraction of the full-attention receptive field reached per layer by the followed "
          "query\n(the last token, or the grid centre); coverage: layers until every query "
          "reaches its whole field")
    print(head + f"{'coverage':>11}")
    covs = [coverage_text(a) for _, a in results]
    for (_op, a), cov in zip(results, covs):
        print(f"{a.pattern:<28}" + "".join(f"{s.reach_fraction:>8.1%}" for s in a.layers)
              + f"{cov:>11}")
    if "never*" in covs:
        print(COVERAGE_NOTE)
    if args.plot:
        from attndsl import render
        render.plot_compare([(op, a) for op, a in results], args.plot)
        print(f"wrote {args.plot}")
    return 0


ANALYZE_HELP = """\
Receptive field, coverage, paths and cost of a pattern stacked --layers deep.

How: the mask is never materialised. An interval interpreter proves boxes of (query, key)
pairs FULL or EMPTY and splits the rest (a quadtree) down to 16 x 16 tiles, which are
evaluated exactly. Translation-invariant and block-structured patterns (windows, dilation,
power-of-two and block rules, causal diagonals) decompose into few rectangles: the fast path,
about a second for a million tokens. Irregular patterns (document ids, hashing, bit tricks
the intervals cannot decide) fall back to dense tiles where needed: the sparse path, seconds
at 65,536 tokens. Summary tokens add edges to every key of their region; content-dependent
patterns (dhsa) are analysed on seeded random q, k (--seed, --dim); per-head patterns use the
union over heads. The report's 'method' line says how many rectangles and tiles were used.
"""


CHECK_HELP = """\
Parse and type-check .attn files (paths or standard library names) and everything they
import; bind the patterns whose parameters all have defaults, which checks their `require`s.
Every error is printed with its location; the exit status is 1 if any file has one. A file
that defines nothing (an empty file) is an error.
"""


def _version() -> str:
    import platform

    import torch

    import attndsl
    return (f"attndsl {attndsl.__version__} (torch {torch.__version__}, Python "
            f"{platform.python_version()})")


COMPILE_HELP = """\
Compile a pattern into block-sparse Triton kernels (forward and backward).

With -o DIR: writes DIR/<name>.py (the generated @triton.jit source, metadata and a loader:
`import <name>` gives `op`, callable as op(q, k, v, backend="triton")) and DIR/<name>.npz
(token orders and block tables). --emit flex also writes DIR/<name>_flex.py, a FlexAttention
mask_mod / score_mod / block_mask for the same pattern, the BlockMask read from the tables in
DIR/<name>_flex.npz. --stats prints full, partial and
empty blocks, tiles, table bytes, build time and computed / needed score elements.
"""


def cmd_compile(args) -> int:
    import json
    op = _compile(args)
    op.options(block_q=args.block_q, block_k=args.block_k)
    inputs = _inputs(args.input)
    if args.output is None and args.emit != "flex":
        stats = op.stats("triton", **inputs)  # what `compile` writes: Triton's plan
        paths = {}
    elif args.output is None:
        raise ParameterError("--emit flex needs -o DIR")
    else:
        from attndsl.codegen.export import export
        res = export(op, args.output, args.name, flex=args.emit == "flex", **inputs)
        stats, paths = res["stats"], res["paths"]
    if args.json:
        print(json.dumps({"paths": paths, "stats": stats}, indent=2, default=str))
        return 0
    for kind, path in paths.items():
        print(f"wrote {path} ({kind})")
    if args.stats or not paths:
        from attndsl.report import format_stats
        print(format_stats(op, stats))
    return 0


CP_PLAN_HELP = """\
Context parallelism planned from the block tables alone: for each dispatch (balanced,
contiguous, zigzag) the per-rank balance (max / mean attended pairs) and the K/V bytes each
rank receives, against ring attention, an all-gather and Ulysses. --library plans every
standard pattern at --tokens. Bytes follow --heads, --kv-heads, --head-dim and --dtype.
"""


def cmd_cp_plan(args) -> int:
    import json

    from attndsl.distributed import report
    geo = report.geometry(args.heads, args.kv_heads, args.head_dim, args.dtype)
    if args.library:
        if args.file is not None:
            raise ParameterError("give a FILE or --library, not both")
        if args.tokens < 16:
            raise ParameterError(f"--tokens must be at least 16, not {args.tokens}")
        def progress(name, s):
            if not args.json:
                print(f"planned {name} in {s:.1f} s", file=sys.stderr, flush=True)
        out = report.library_rows(args.tokens, args.ranks, geo, progress=progress,
                                  block=args.block)
    else:
        if args.file is None:
            raise ParameterError("cp-plan needs a FILE (with -p PATTERN) or --library")
        op = _compile(args)
        op.options(block_q=args.block, block_k=args.block)
        out = report.rows(op, _inputs(args.input), args.ranks, geo)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(report.table(out), end="")
    return 0


# -- `attndsl bench` (issue 5): runs the repository's bench/cpu_bench.py ----------------


def cmd_bench(args) -> int:
    """bench/ is not part of the installed package, so the benchmark is found next to the
    source checkout this attndsl was imported from (and refused clearly without one)."""
    import importlib.util

    import attndsl
    path = Path(attndsl.__file__).resolve().parent.parent / "bench" / "cpu_bench.py"
    if not path.is_file():
        print(f"error: {path} not found: `attndsl bench` runs the CPU benchmark of a source "
              "checkout of attndsl (bench/ is not installed with the package)", file=sys.stderr)
        return 1
    spec = importlib.util.spec_from_file_location("attndsl_cpu_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    return mod.run(args)


# -- end of `attndsl bench` -------------------------------------------------------------


# -- `attndsl eval` (issue 16): recall of tiny models against the analysed reach ---------

EVAL_HELP = """\
Train tiny transformers built from attndsl.nn layers on the CPU on a recall task and
report accuracy per query-to-value distance band against each pattern's analysed reach
(docs/eval.md). A dense-attention control runs first. Patterns: FILE -p PATTERN (every
layer) and --compare specs FILE:PATTERN or FILE:PATTERN(name=value, ...); join specs with
'+' for one pattern per layer (layer 1 first). --set gives a parameter to every pattern
that has it; a spec's own values win.
"""


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def _eval_op(spec: str, sets: dict, used: set, args):
    """One FILE:PATTERN(name=value, ...) spec compiled, with the --set values it has."""
    import re
    m = re.fullmatch(r"\s*(.+):([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", spec, re.S)
    if m is None:
        raise ParameterError(f"--compare takes FILE:PATTERN or FILE:PATTERN(name=value, ...), "
                             f"not '{spec}'")
    file, name, body = m.groups()
    own = {}
    for item in _split_top(body or "", ","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ParameterError(f"'{spec}': parameters are name=value, not '{item.strip()}'")
        k, v = item.split("=", 1)
        own[k.strip()] = parse_value(v)
    return _eval_compile(file, name, own, sets, used, args)


def _eval_compile(file: str, name: str | None, own: dict, sets: dict, used: set, args):
    from attndsl.api import compile_module, find_pattern
    module = _load(file, args)
    names = {p.name for p in find_pattern(module, name).params}
    mine = {k: v for k, v in sets.items() if k in names}
    used |= set(mine)
    return compile_module(module, name, {**mine, **own})


def cmd_eval(args) -> int:
    import json

    from attndsl.evaluation import evaluate
    sets = _sets(args.set)
    used: set = set()
    arms = []
    if args.file is not None:
        arms.append(_eval_compile(args.file, args.pattern, {}, sets, used, args))
    elif args.pattern:
        raise ParameterError("-p names a pattern of FILE: give the file too")
    for spec in args.compare or ():
        ops = [_eval_op(s, sets, used, args) for s in _split_top(spec, "+")]
        arms.append(ops[0] if len(ops) == 1 else ops)
    unused = set(sets) - used
    if unused:
        raise ParameterError("no evaluated pattern has parameter"
                             f"{'s' if len(unused) > 1 else ''} " + ", ".join(sorted(unused)))
    for what, path in (("results", args.output), ("plot", args.plot)):
        folder = Path(path).parent if path else None
        if folder is not None and not folder.is_dir():  # found out now, not after training
            raise ParameterError(f"no folder '{folder}' for the {what} ('{path}')")
    try:
        res = evaluate(*arms, task=args.task, layers=args.layers, steps=args.steps,
                       budget=args.budget, seeds=args.seeds, control=not args.no_control,
                       seq_len=args.seq_len, vocab=args.vocab, items=args.items,
                       power_a=args.power_a, distance=args.distance, d_model=args.d_model,
                       heads=args.heads, batch=args.batch, lr=args.lr, warmup=args.warmup,
                       test_sequences=args.test_sequences, bands=args.bands,
                       equal_flops=not args.no_equal_flops, threads=args.threads,
                       backend=args.backend, import_roots=_roots(args),
                       progress=args.progress)
    except KeyboardInterrupt:  # before the first run had started
        print("interrupted before any run started: no results", file=sys.stderr)
        return 130
    if args.output:
        res.save(args.output)
    if args.plot:
        res.plot(args.plot)
    if args.json:
        print(json.dumps(res.to_json(), indent=1))
    else:
        print(res.text())
        for what, path in (("results", args.output), ("plot", args.plot)):
            if path:
                print(f"wrote {path} ({what})")
    return 130 if res.interrupted else 0


def _eval_parser(sub) -> None:
    c = sub.add_parser("eval", help="recall of tiny models trained on the CPU, per distance, "
                       "against the analysed reach", description=EVAL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("file", nargs="?", help="the .attn file of the pattern under test")
    c.add_argument("-p", "--pattern", help="pattern name (optional if the file has one)")
    c.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="parameter value, given to every pattern that has the parameter")
    c.add_argument("--compare", nargs="+", metavar="SPEC",
                   help="more arms: FILE:PATTERN or FILE:PATTERN(name=value, ...); "
                   "SPEC+SPEC+... gives one pattern per layer")
    c.add_argument("--task", choices=["mqar", "passkey", "copy"], default="mqar")
    c.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    how = c.add_mutually_exclusive_group()
    how.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                     help="CPU time of the first run's training steps; its step count is "
                     "every run's (default 300)")
    how.add_argument("--steps", type=int, default=None, metavar="K", help="training steps")
    c.add_argument("--seeds", type=int, default=2, help="seeds 0..S-1 (default 2)")
    c.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default "
                   "128, or the N a pattern was compiled with)")
    c.add_argument("--vocab", type=int, default=256)
    c.add_argument("--items", type=int, default=8,
                   help="mqar: key-value pairs; copy: tokens to copy (default 8)")
    c.add_argument("--power-a", type=float, default=0.01, help="mqar: the gap power law")
    c.add_argument("--distance", type=int, default=None,
                   help="passkey: one fixed distance (default: all)")
    c.add_argument("--d-model", type=int, default=64)
    c.add_argument("--heads", type=int, default=4)
    c.add_argument("--batch", type=int, default=64)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--warmup", type=int, default=50)
    c.add_argument("--test-sequences", type=int, default=None,
                   help="test set size (default: about 8,192 answers)")
    c.add_argument("--bands", type=int, default=8, help="distance bands (default 8)")
    c.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    c.add_argument("--backend", default="cpu", help="attention backend (default cpu)")
    c.add_argument("--no-control", action="store_true", help="no dense control arm")
    c.add_argument("--no-equal-flops", action="store_true",
                   help="score at equal steps only (no extra steps for cheaper patterns)")
    c.add_argument("--json", action="store_true", help="print the JSON result instead")
    c.add_argument("-o", "--output", metavar="FILE.json", help="write the JSON result")
    c.add_argument("--plot", metavar="OUT.png", help="accuracy against distance, with reach")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress lines on stderr (default: on a terminal)")
    c.add_argument("--import-root", action="append", metavar="DIR",
                   help="a folder imports may read (repeatable)")
    c.set_defaults(func=cmd_eval)


# -- end of `attndsl eval` --------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attndsl", description="Compile and inspect attention "
                                 "patterns written in .attn files.")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="cmd", required=True)
    def import_root(c):
        c.add_argument("--import-root", action="append", metavar="DIR",
                       help="a folder imports may read besides the file's own folder and "
                       "the standard library (repeatable)")

    c = sub.add_parser("check", help="parse, type-check and check default constraints",
                       description=CHECK_HELP)
    c.add_argument("files", nargs="+")
    import_root(c)
    c.set_defaults(func=cmd_check)
    c = sub.add_parser("list", help="patterns, parameters, defaults and doc comments",
                       description="List the patterns of an .attn file (a path or a standard "
                       "library name such as sliding.attn): signature with defaults, run-time "
                       "inputs and doc comment.")
    c.add_argument("file")
    import_root(c)
    c.set_defaults(func=cmd_list)

    def common(c):
        c.add_argument("file")
        import_root(c)
        c.add_argument("-p", "--pattern", help="pattern name (optional if the file has one)")
        c.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help="parameter value: 7, 7,9 (per axis), true, 1.5")
        c.add_argument("--input", action="append", metavar="NAME=VALUE",
                       help="run-time input: a value, a comma list, or @file.npy")
        c.add_argument("--seed", type=int, default=0,
                       help="seed of the random q, k for content-dependent patterns")
        c.add_argument("--dim", type=int, default=16,
                       help="head dim of the random q, k for content-dependent patterns")
    c = sub.add_parser("mask", help="write the dense boolean mask as .npy",
                       description="Compile a pattern with --set values and write its dense "
                       "bool mask [queries, keys] ([heads, ...] when per head) to -o in NumPy's "
                       ".npy format, under exactly the name given.")
    common(c)
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=cmd_mask)
    c = sub.add_parser("show", help="draw the mask (text, or PNG with -o)",
                       description="Draw a pattern's mask: text in the terminal (averaged "
                       "cells when it is larger than --width), or a PNG with -o; for grids also "
                       "the keys of one query on the key grid (--query), for sequences the "
                       "keys of --query when given.")
    common(c)
    c.add_argument("-o", "--output", help="PNG file; without it, text in the terminal")
    c.add_argument("--query", help="query to highlight: flat index or coordinates like 3,4")
    c.add_argument("--width", type=int, default=64, help="text width in cells")
    c.set_defaults(func=cmd_show)
    c = sub.add_parser("analyze", help="receptive field, coverage and cost over layers",
                       description=ANALYZE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common(c)
    c.add_argument("--layers", type=int, default=4, help="stacked layers (default 4)")
    c.add_argument("--query", help="the query followed: flat index or coordinates like 3,4 "
                   "(default: the last token, or the centre of a grid)")
    c.add_argument("--head-dim", type=int, default=64, help="D for the FLOP counts")
    c.add_argument("--path", nargs=2, metavar=("FROM", "TO"),
                   help="also list the shortest hop path from query FROM to token TO")
    c.add_argument("--json", action="store_true",
                   help="print the report as JSON instead (its schema: docs/analysis.md)")
    c.add_argument("--plot", help="PNG of the reached tokens per layer")
    c.set_defaults(func=cmd_analyze)
    c = sub.add_parser("compile", help="generate the Triton kernels; export them with -o",
                       description=COMPILE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common(c)
    c.add_argument("-o", "--output", metavar="DIR", help="write the module and tables here")
    c.add_argument("--name", help="module name (default attn_<pattern>)")
    c.add_argument("--block-q", type=int, default=None, help="query block (default 64)")
    c.add_argument("--block-k", type=int, default=None, help="key block (default 64)")
    c.add_argument("--stats", action="store_true", help="print the block statistics")
    c.add_argument("--json", action="store_true", help="print paths and statistics as JSON")
    c.add_argument("--emit", choices=["flex"], help="also export a FlexAttention mask_mod")
    c.set_defaults(func=cmd_compile)
    # -- bench: the same flags as bench/cpu_bench.py (tests/test_bench.py keeps them equal)
    c = sub.add_parser("bench", help="CPU benchmark: ours vs FlexAttention, SDPA and NATTEN "
                       "(needs a source checkout)",
                       description="Time the CPU backend's forward (and backward) against "
                       "compiled FlexAttention, SDPA with a dense mask and NATTEN on the "
                       "standard cases; writes bench/results/ (bench/cpu_bench.py).")
    c.add_argument("--quick", action="store_true",
                   help="small sizes for smoke testing (N=2048, grids 32x32 and 8x16x16)")
    c.add_argument("--cases", help="comma-separated cases or patterns (default all)")
    c.add_argument("--repeats", type=int, default=5,
                   help="timed calls of ours after the warm-up (default 5)")
    c.add_argument("--peer-repeats", type=int, default=None,
                   help="timed calls of each peer (default 3, or --repeats when smaller)")
    c.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default bench/results)")
    c.add_argument("--no-write", action="store_true",
                   help="print only; write no .md, .json or .png")
    c.add_argument("--big", action="store_true",
                   help="also try compiled create_block_mask at N=65,536 (one attempt)")
    c.set_defaults(func=cmd_bench)
    # -- end of bench
    c = sub.add_parser("cp-plan", help="context parallelism from the tables: balance and "
                       "K/V traffic per rank against ring, all-gather and Ulysses",
                       description=CP_PLAN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common(c)
    c.set_defaults(file=None)
    c._actions[[a.dest for a in c._actions].index("file")].nargs = "?"
    c.add_argument("--ranks", type=int, required=True, help="number of ranks")
    c.add_argument("--library", action="store_true", help="every standard pattern")
    c.add_argument("--tokens", type=int, default=1 << 20,
                   help="sequence length for --library (default 1,048,576)")
    c.add_argument("--block", type=int, default=None,
                   help="block size (default 64; --library: 64, or 4x larger blocks until a "
                   "pattern's pairs fit the planner's limit)")
    c.add_argument("--heads", type=int, default=32, help="query heads (for bytes)")
    c.add_argument("--kv-heads", type=int, default=8, help="key/value heads (for bytes)")
    c.add_argument("--head-dim", type=int, default=128, help="head dim (for bytes)")
    c.add_argument("--dtype", default="bf16", help="fp32, bf16, fp16 or fp64 (for bytes)")
    c.add_argument("--json", action="store_true",
                   help="one row per (pattern, scheme): scheme, max_pairs, mean_pairs, "
                   "max_kv_bytes, mean_kv_bytes, ...")
    c.set_defaults(func=cmd_cp_plan)
    c = sub.add_parser("compare", help="receptive-field growth of several patterns",
                       description="Analyse several patterns stacked --layers deep and print "
                       "the fraction of the full-attention receptive field each reaches per "
                       "layer, and the layers to full coverage (--plot: one line each).")
    c.add_argument("patterns", nargs="+", metavar="FILE[:PATTERN]",
                   help="a file (all its patterns, or those named by -p) or FILE:PATTERN")
    c.add_argument("-p", "--pattern", action="append", metavar="NAME",
                   help="compare this pattern of each FILE given without :PATTERN "
                   "(repeatable)")
    c.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="parameter value, given to every pattern that has the parameter")
    c.add_argument("--input", action="append", metavar="NAME=VALUE",
                   help="run-time input, given to every pattern that declares it: a value, "
                   "a comma list, or @file.npy")
    c.add_argument("--seed", type=int, default=0,
                   help="seed of the random q, k for content-dependent patterns")
    c.add_argument("--dim", type=int, default=16,
                   help="head dim of the random q, k for content-dependent patterns")
    c.add_argument("--layers", type=int, default=6, help="stacked layers (default 6)")
    c.add_argument("--plot", help="PNG: reached fraction per layer, one line per pattern")
    import_root(c)
    c.set_defaults(func=cmd_compare)
    _eval_parser(sub)
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
    except OSError as e:  # e.g. an output file in a missing directory
        where = f": '{e.filename}'" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main", "parse_value", "Path"]

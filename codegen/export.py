"""`attndsl compile -o DIR`: a self-contained, inspectable Python module per pattern.

DIR/<name>.py holds the generated @triton.jit source exactly as the runtime uses it, the
metadata (pattern, parameters, orders, statistics) and a loader; DIR/<name>.npz holds the
token orders and block tables. `import <name>` gives `op`, an attndsl.Op whose Triton
backend uses these kernels and tables without regenerating or re-planning them.
"""

from __future__ import annotations

import json
import keyword
import os
import sys
from pathlib import Path

import numpy as np

from attndsl.codegen.plan.orders import TokenOrder
from attndsl.codegen.plan.tables import BlockTable, Plan

LOADER = '''

# ---------------------------------------------------------------- attndsl export
# Everything above is the generated kernel source; below, its metadata and loader.
METADATA = json.loads({meta!r})
PATTERN_SOURCE = {source!r}


def _load():
    from attndsl.codegen.export import load_exported
    return load_exported(sys.modules[__name__], METADATA, PATTERN_SOURCE,
                         os.path.splitext(__file__)[0] + ".npz")


op = _load()
'''


def export(op, out_dir: str | os.PathLike, /, name: str | None = None, flex: bool = False,
           **inputs) -> dict:
    """Write DIR/<name>.py (+ .npz, + _flex.py with flex=True); return paths and stats."""
    bp = op.bound
    name = f"attn_{bp.name}" if name is None else name
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        from attndsl.errors import ParameterError
        raise ParameterError(f"the module name must be a Python identifier (the module is "
                             f"imported as `import NAME` and written to DIR/NAME.py), not "
                             f"{name!r}")
    kern = op.kernel(**inputs)
    plan = op.plan("triton", **inputs)  # the module's kernels are Triton's
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"qperm": plan.qorder.perm, "kperm": plan.korder.perm}
    for i, (t, tt) in enumerate(zip(plan.tables, plan.transposed)):
        for attr in ("full_off", "full_idx", "part_off", "part_idx"):
            arrays[f"t{i}_{attr}"] = getattr(t, attr)
            arrays[f"tt{i}_{attr}"] = getattr(tt, attr)
        arrays[f"t{i}_needed"] = np.asarray(plan.table_needed(i))
    for n, v in plan.run.values.items():  # the mask's run-time inputs the tables are for
        if v is not None:
            arrays[f"in_{n}"] = np.asarray(v)
    np.savez(out / f"{name}.npz", **arrays)
    meta = {
        "pattern": bp.name, "file": str(Path(bp.checked.file).resolve())
        if os.path.exists(bp.checked.file) else bp.checked.file,
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in bp.values.items()},
        "block_q": plan.block_q, "block_k": plan.block_k,
        "qorder": _order_meta(plan.qorder),
        "korder": _order_meta(plan.korder),
        "heads_tables": len(plan.tables),
        "stats": plan.stats(),
        "attndsl": _version(),
    }
    text = kern.source.rstrip("\n") + "\n"
    text = text.replace("import triton\n", "import json\nimport os\nimport sys\n\nimport triton\n",
                        1)
    text += LOADER.format(meta=json.dumps(meta, default=_default),
                          source=_module_text(bp))
    py = out / f"{name}.py"
    py.write_text(text)
    paths = {"module": str(py), "tables": str(out / f"{name}.npz")}
    if flex:  # mask_mod and Flex's row-major tables at its block size, shipped beside it
        from attndsl.codegen.flex import FLEX_BLOCK, csr_arrays, flex_source
        from attndsl.codegen.plan.tables import plan_for
        fplan = plan_for(bp, FLEX_BLOCK, FLEX_BLOCK, plan.run, "row-major")
        fp = out / f"{name}_flex.py"
        np.savez(out / f"{name}_flex.npz", **csr_arrays(fplan))
        fp.write_text(flex_source(bp, f"{name}_flex.npz"))
        paths["flex"] = str(fp)
        paths["flex_tables"] = str(out / f"{name}_flex.npz")
    return {"paths": paths, "stats": meta["stats"]}


def _module_text(bp) -> str:
    from attndsl.errors import UnsupportedError
    text = bp.checked.text
    if text is None:  # pragma: no cover - every loader path records the text
        raise UnsupportedError("only patterns loaded from a file or source text can be "
                               "exported")
    return text


def _version() -> str:
    from attndsl import __version__
    return __version__


def _default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return str(x)


def _jsonable(x):
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    return x


def _tuple(x):
    if isinstance(x, list):
        return tuple(_tuple(v) for v in x)
    return x


def load_exported(module, meta: dict, source: str, tables_path: str):
    """The Op of an exported module, using the module's kernels and the saved tables."""
    from attndsl.api import Op
    from attndsl.lang.checker import check_pattern
    from attndsl.lang.loader import Loader
    from attndsl.semantics.bind import bind
    from attndsl.semantics.inputs import validate
    path = meta["file"]
    base = Path(path).parent if os.path.isabs(path) and Path(path).parent.exists() else None
    mod = Loader().load_text(source, path, base)
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
    bp = bind(check_pattern(mod, mod.scope[meta["pattern"]]), params)
    data = np.load(tables_path)

    def order(key, perm):
        o = meta[key]
        block = meta["block_q"] if key == "qorder" else meta["block_k"]
        return TokenOrder(tuple(o["shape"]), tuple(o["tile"]), tuple(o["dilation"]),
                          data[perm], tile_block=block)

    tables, transposed = [], []
    for i in range(meta["heads_tables"]):
        needed = int(data[f"t{i}_needed"])
        tables.append(BlockTable(*(data[f"t{i}_{a}"] for a in (
            "full_off", "full_idx", "part_off", "part_idx")), needed))
        transposed.append(BlockTable(*(data[f"tt{i}_{a}"] for a in (
            "full_off", "full_idx", "part_off", "part_idx")), needed))
    run = validate(bp, {k[3:]: data[k] for k in data.files if k.startswith("in_")},
                   for_mask=True)
    plan = Plan(order("qorder", "qperm"), order("korder", "kperm"), meta["block_q"],
                meta["block_k"], tuple(tables), tuple(transposed),
                meta["stats"]["build_seconds"], bp, run)
    return Op(bp, block_q=meta["block_q"], block_k=meta["block_k"]).use_compiled(
        plan, module)


__all__ = ["export", "load_exported", "sys"]


def _order_meta(o) -> dict:
    """A token order's shape, tiles and dilation groups (and the tiles' offset, when they
    do not start at 0): the permutation itself is in the .npz."""
    out = {"shape": list(o.shape), "tile": list(o.tile), "dilation": list(o.dilation)}
    if any(o.phase):
        out["phase"] = list(o.phase)
    return out

"""CPU benchmark (issue 5): attndsl's backend="cpu" against FlexAttention, SDPA and NATTEN.

Every system runs in one process on the same fp32 tensors (B=1, 4 heads, D=64), so the
numbers are side by side on one machine:

  ours    op(q, k, v, backend="cpu") with the block sizes and token orders its planner
          chooses; build = plan_for(op.bound, target="cpu"), that choice included
  flex    torch.compile(flex_attention) with create_block_mask (eager) on the mask_mod that
          attndsl exports (codegen/flex.py); inference only, so it runs under no_grad
  sdpa    scaled_dot_product_attention with the dense bool mask from op.mask()
  natten  natten.na2d / na3d on the neighborhood cases (its CPU path: the flex-fna backend)

Times are medians of wall-clock calls after one warm-up call; useful GFLOP/s count the
attended pairs only (4 * nnz * D * heads per forward) and are set against the fp32 matmul
peak measured in the same run with the same torch threads. A failing peer is recorded with
its exception and the run goes on; targets are printed as PASS / FAIL lines, never asserted.

    python bench/cpu_bench.py [--quick] [--cases sliding_window,na2d] [--repeats 5]
                              [--peer-repeats 3] [--out DIR] [--no-write] [--big]
    attndsl bench ...         # the same flags

Results: a markdown table (stdout and bench/results/cpu_<machine>.md), JSON with the machine
(CPU model, cores, versions, threads) and a log-scale bar chart (cpu_<machine>.png).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("ours", "flex", "sdpa", "natten")
BATCH, HEADS, HEAD_DIM, BLOCK = 1, 4, 64, 64
DENSE_LIMIT = 8 * 2**30  # fp32 scores N*N*heads*4 bytes: SDPA's dense path above this is skipped
# NATTEN's CPU path is eager flex, which peaks near 5x the fp32 scores (measured 4.4x at
# 64 x 64); above the limit it runs a few heads per call so that the machine does not swap.
NATTEN_FACTOR, NATTEN_LIMIT = 5, 10 * 2**30
MATMUL_N = 2048
FLEX_BLOCK = 128  # create_block_mask's default, which Flex's CPU template is tuned for
BIG_N = 1 << 20  # block-table build target
FLEX_BIG_N = 65536  # compiled create_block_mask, only with --big


@dataclass(frozen=True)
class Case:
    """One benchmark case: a pattern with its full-size and --quick parameters."""

    name: str
    file: str
    pattern: str
    full: dict
    quick: dict
    natten: bool = False  # neighborhood pattern: NATTEN is a peer
    note: str = ""


CASES = (
    Case("sliding_window", "sliding.attn", "sliding_window", dict(N=16384, window=1024),
         dict(N=2048, window=256)),
    Case("power_attention", "power.attn", "power_attention", dict(N=16384), dict(N=2048)),
    Case("na2d_k13", "neighborhood.attn", "na2d", dict(H=128, W=128, kernel=13),
         dict(H=32, W=32, kernel=13), natten=True),
    Case("na2d_k7_dil4", "neighborhood.attn", "na2d", dict(H=128, W=128, kernel=7, dilation=4),
         dict(H=32, W=32, kernel=7, dilation=4), natten=True),
    Case("na3d_k5", "neighborhood.attn", "na3d", dict(T=16, H=32, W=32, kernel=5),
         dict(T=8, H=16, W=16, kernel=5), natten=True),
    Case("combiner_fixed", "combiner.attn", "combiner_fixed", dict(N=16384, span=128),
         dict(N=2048, span=128)),
    Case("dhsa", "dhsa.attn", "dhsa_chunks", dict(N=16384), dict(N=2048)),
)
CASE_NAMES = tuple(c.name for c in CASES)


# ------------------------------------------------------------------ arguments


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags, shared in meaning with `attndsl bench` (which declares the same ones)."""
    ap.add_argument("--quick", action="store_true",
                    help="small sizes for smoke testing (N=2048, grids 32x32 and 8x16x16)")
    ap.add_argument("--cases", help="comma-separated cases or patterns (na2d = both na2d "
                    "cases); default all: " + ", ".join(CASE_NAMES))
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed calls of ours after the warm-up (default 5)")
    ap.add_argument("--peer-repeats", type=int, default=None,
                    help="timed calls of each peer (default 3, or --repeats when smaller)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="results folder (default bench/results)")
    ap.add_argument("--no-write", action="store_true",
                    help="print only; write no .md, .json or .png")
    ap.add_argument("--big", action="store_true",
                    help=f"also try compiled create_block_mask at N={FLEX_BIG_N:,} (one attempt)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="cpu_bench.py", description=__doc__.split("\n")[0])
    add_arguments(ap)
    return ap.parse_args(argv)


def select_cases(spec: str | None) -> list[Case]:
    """Names or pattern names, so that `--cases na2d` picks both grid cases."""
    if not spec:
        return list(CASES)
    chosen: list[Case] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        hits = [c for c in CASES if token in (c.name, c.pattern)]
        if not hits:
            raise ValueError(f"unknown case '{token}'; choose from {', '.join(CASE_NAMES)} "
                             "(or a pattern name: na2d, na3d)")
        chosen += [c for c in hits if c not in chosen]
    return chosen


# ------------------------------------------------------------------ small helpers


def short_error(e: BaseException) -> str:
    """Exception type and first line: enough to tell OOM from unsupported from a bug."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    first = re.sub(r"^(\S+:\d+:\d+: )?error: ", "", first)  # attndsl's located errors
    return f"{type(e).__name__}: {first[:200]}".rstrip(": ")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


class Progress:
    """A progress bar on stderr (tqdm when it is installed; it is not a dependency)."""

    def __init__(self, total: int):
        self.total, self.done, self.bar = total, 0, None
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, unit="step", leave=False)
        except ImportError:
            pass
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        """Announce the step about to run (so a slow one shows what it is)."""
        if self.bar is not None:
            self.bar.set_description_str(label)
            return
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        line = f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {label}"
        sys.stderr.write(("\r" + line.ljust(78)) if self.tty else line + "\n")
        sys.stderr.flush()

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()


def timed(fn, repeats: int, warmup: int = 1) -> tuple[dict, object]:
    """Median wall-clock seconds of `repeats` calls after `warmup` calls (the first call
    carries compilation and table building, so it is kept apart as first_s)."""
    out, first = None, None
    for _ in range(max(warmup, 0)):
        t0 = time.perf_counter()
        out = fn()
        first = first if first is not None else time.perf_counter() - t0
    samples = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(samples), "first_s": first,
            "samples_s": [round(s, 6) for s in samples]}, out


def calls_for(span: float, call_s: float) -> int:
    """Calls of call_s seconds that fill `span` seconds (at least 1, at most CALLS_CAP)."""
    return max(1, min(CALLS_CAP, math.ceil(span / max(call_s, 1e-9))))


CALLS_CAP = 25  # calls a round that interleaved's `spans` may ask for
ROUND_SPAN = 0.25  # seconds of ours' calls a round: short calls get more samples


def interleaved(fns: dict, repeats: int, spans: dict | None = None) -> dict:
    """Per name: median seconds of its calls, taken in `repeats` rounds in turn with the
    others' (one warm-up call each first, kept as first_s), the samples, and the last
    output; a name in `spans` makes as many calls a round as fill its span (a second
    warm-up call measures it), so that a call of 20 ms is not judged on five samples while
    a peer's take seconds; a callable that raises is dropped with its error and the others
    go on."""
    res: dict = {}
    live = dict(fns)
    per = {name: 1 for name in fns}
    for name, fn in list(live.items()):
        t0 = time.perf_counter()
        try:
            res[name] = {"out": fn(), "first_s": time.perf_counter() - t0, "samples_s": []}
            if (spans or {}).get(name):
                t0 = time.perf_counter()
                res[name]["out"] = fn()
                per[name] = calls_for(spans[name], time.perf_counter() - t0)
        except Exception as e:
            res[name] = {"error": short_error(e)}
            del live[name]
    for _ in range(max(repeats, 1)):
        for name, fn in list(live.items()):
            for _ in range(per[name]):
                t0 = time.perf_counter()
                try:
                    res[name]["out"] = fn()
                except Exception as e:
                    res[name] = {"error": short_error(e)}
                    del live[name]
                    break
                res[name]["samples_s"].append(time.perf_counter() - t0)
    for name in live:
        r = res[name]
        r["median_s"] = statistics.median(r["samples_s"])
        r["samples_s"] = [round(x, 6) for x in r["samples_s"]]
    return res


def max_err(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# ------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where it does not say."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    pairs = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            pairs.add((fields.get("physical id", "0"), fields["core id"]))
    return len(pairs) or None


def natten_status() -> tuple[object, str]:
    """The natten module (or None) and a line saying what its CPU path is."""
    try:
        import natten
    except Exception as e:  # ImportError, or a broken install
        return None, f"not installed ({short_error(e)})"
    ver = getattr(natten, "__version__", "?")
    lib = getattr(natten, "HAS_LIBNATTEN", False)
    return natten, (f"{ver} ({'with' if lib else 'without'} libnatten; CPU path: flex-fna "
                    "backend, eager)")


def machine_info() -> dict:
    import torch
    try:
        import triton
        triton_ver = triton.__version__
    except Exception as e:
        triton_ver = f"not installed ({short_error(e)})"
    _, nat = natten_status()
    return {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "triton": triton_ver, "natten": nat, "flags": cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(), "host": platform.node(),
    }


def matmul_call(n: int = MATMUL_N):
    """One n x n @ n x n fp32 matmul a call, on inputs made once: timed in a case's own
    rounds, so the share of the peak sees the load the case saw."""
    import torch
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    return lambda: a @ b


def matmul_peak(n: int = MATMUL_N, repeats: int = 5) -> dict:
    """Best fp32 GFLOP/s of an n x n @ n x n matmul: the ceiling the % peak column uses."""
    mm = matmul_call(n)
    mm()
    best = min(_once(mm) for _ in range(repeats))
    return {"n": n, "best_s": best, "gflops": 2 * n**3 / best / 1e9, "repeats": repeats}


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ systems


_FLEX = None


def compiled_flex():
    """One torch.compile(flex_attention) for the whole run, with room for one graph per
    case: past dynamo's recompile limit it would silently fall back to (slow) eager."""
    global _FLEX
    if _FLEX is None:
        import torch
        import torch._dynamo.config as dcfg
        from torch.nn.attention.flex_attention import flex_attention
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, max(getattr(dcfg, knob), 64))
                break
        _FLEX = torch.compile(flex_attention)
    return _FLEX


def flex_namespace(op) -> dict:
    """mask_mod, score_mod and set_inputs from attndsl's FlexAttention exporter."""
    from attndsl.codegen.flex import flex_source
    ns: dict = {}
    exec(compile(flex_source(op.bound), f"<flex:{op.name}>", "exec"), ns)
    return ns


def sdpa_mask(m):
    """op.mask() as [1, 1|H, N, N] for SDPA."""
    if m.dim() == 2:
        return m.view(1, 1, *m.shape)
    return m.unsqueeze(0) if m.dim() == 3 else m


def natten_call(natten, op, case_params: dict, n: int, heads: int, scale: float):
    """NATTEN on our [B, heads, N, D] tensors: to its heads-last [B, *grid, heads, D] layout
    and back, with our kernel, dilation, stride and causal. Eager flex (NATTEN refuses compiled
    flex without CUDA), a few heads per call when all at once would not fit in memory."""
    import torch
    dims = tuple(op.bound.qshape)
    fn = {2: natten.na2d, 3: natten.na3d}.get(len(dims))
    if fn is None:
        raise NotImplementedError(f"no NATTEN function for {len(dims)}-D grids")
    kw = dict(kernel_size=case_params["kernel"], dilation=case_params.get("dilation", 1),
              stride=case_params.get("stride", 1), is_causal=case_params.get("causal", False),
              scale=scale, backend="flex-fna", torch_compile=False)
    est = NATTEN_FACTOR * n * n * heads * 4
    per = heads if est <= NATTEN_LIMIT else max(1, int(heads * NATTEN_LIMIT // est))

    def to_nat(t):
        b, h, _, d = t.shape
        return t.transpose(1, 2).reshape(b, *dims, h, d)

    def run(q, k, v):
        parts = []
        for h0 in range(0, heads, per):
            sl = slice(h0, h0 + per)
            o = fn(to_nat(q[:, sl]), to_nat(k[:, sl]), to_nat(v[:, sl]), **kw)
            parts.append(o.reshape(q.shape[0], n, o.shape[-2], o.shape[-1]).transpose(1, 2))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    note = (f"natten.na{len(dims)}d flex-fna eager"
            + ("" if per == heads else f", {per} head(s) per call (memory)"))
    return run, note


# ------------------------------------------------------------------ one case


@dataclass
class Settings:
    """What one run varies (the tensor shapes are fixed by issue 5)."""

    quick: bool
    repeats: int
    peer_repeats: int
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    batch: int = BATCH
    block: int | None = None  # None: the CPU planner's block sizes (codegen/plan/tables.py)


def run_case(case: Case, cfg: Settings, progress: Progress) -> dict:
    """Time ours and each peer on one case; check correctness once; never raise."""
    import torch
    import torch.nn.functional as F

    import attndsl
    from attndsl.codegen.cpu.fused import native_computed
    from attndsl.codegen.plan.tables import plan_for
    params = dict(case.quick if cfg.quick else case.full)
    row: dict = {"case": case.name, "file": case.file, "pattern": case.pattern,
                 "params": params, "systems": {s: {} for s in SYSTEMS}, "check": {}}
    rec = row["systems"]
    steps = 5
    try:
        op = attndsl.compile(ROOT / "patterns" / case.file, case.pattern, **params)
        op.options(block_q=cfg.block, block_k=cfg.block)
    except Exception as e:
        row["error"] = short_error(e)
        for _ in range(steps):
            progress.advance()
        return row
    bp = op.bound
    n, h, d, b = bp.nq, cfg.heads, cfg.head_dim, cfg.batch
    row["N"] = n
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(b, h, n, d, generator=g) for _ in range(4))
    scale = 1.0 / math.sqrt(d)
    scores_bytes = n * n * h * 4
    outs: dict = {}

    # the mask's nnz (per batch, over all heads), from our tables or, for content-dependent
    # patterns, from the mask on these q, k (which SDPA then uses)
    content_mask = None
    progress.step(f"{case.name}: ours (tables)")
    try:
        t0 = time.perf_counter()  # the block sizes' choice included
        plan = plan_for(bp, cfg.block, cfg.block, target="cpu")
        st = plan.stats()
        rec["ours"]["build_s"] = time.perf_counter() - t0
        rec["ours"]["tables"] = {k_: st[k_] for k_ in (
            "full_blocks", "partial_blocks", "computed_elements", "needed_elements", "waste",
            "block_table_bytes", "order_q", "order_k", "block_q", "block_k")}
        # what flash.c's forward and backward compute: the tables' blocks less the keys that
        # no query of a 16-row tile attends (None: they do not run this case)
        rec["ours"]["tables"]["native_elements"] = native_computed(plan)
        nnz = st["needed_elements"] * (h if st["head_tables"] == 1 else 1)
    except Exception as e:
        rec["ours"]["build_error"] = short_error(e)
        nnz = None
    try:
        if bp.content_dependent:
            t0 = time.perf_counter()
            content_mask = op.mask(q=q, k=k)
            row["content_mask_s"] = time.perf_counter() - t0
            nnz = int(content_mask.sum()) // b
        elif nnz is None and scores_bytes < DENSE_LIMIT:
            m = op.mask()
            nnz = int(m.sum()) * (h if m.dim() == 2 else 1)
        row["nnz_direct"] = nnz
        if bp.summaries and nnz is not None:
            extra = 0
            for s in op.summaries():
                att = s["attend"]
                extra += int(att.sum()) * (h if att.dim() == 2 else 1)
            row["summary_pairs"] = extra
            nnz += extra
    except Exception as e:
        row["nnz_error"] = short_error(e)
    row["nnz"] = nnz
    row["density"] = nnz / (h * n * bp.nk) if nnz else None

    # 1. ours and FlexAttention (compiled, on the block mask of our exported mask_mod),
    # forward: one warm-up call each (Flex compiles in its), then the two interleaved,
    # `repeats` rounds, so that a change in the machine's load falls on both
    def ours(a, b_, c):
        return op(a, b_, c, backend="cpu", scale=scale)

    fns = {"ours": lambda: ours(q, k, v)}
    progress.step(f"{case.name}: flex (compiling)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask
        try:
            ns = flex_namespace(op)
        except attndsl.UnsupportedError as e:
            raise _Refused(f"refused by attndsl's flex export: {short_error(e)}") from None
        t0 = time.perf_counter()
        bm = create_block_mask(ns["mask_mod"], None, h if bp.head_dependent else None, n,
                               bp.nk, device="cpu", BLOCK_SIZE=FLEX_BLOCK)
        rec["flex"]["build_s"] = time.perf_counter() - t0
        rec["flex"]["note"] = (f"torch.compile(flex_attention), BLOCK_SIZE {FLEX_BLOCK} "
                               "(create_block_mask's default), no_grad")
        flex = compiled_flex()
        fns["flex"] = lambda: flex(q, k, v, block_mask=bm, score_mod=ns["score_mod"],
                                   scale=scale)
    except _Refused as e:
        rec["flex"]["error"] = str(e)
    except Exception as e:
        rec["flex"]["error"] = short_error(e)
    progress.advance()
    progress.step(f"{case.name}: ours fwd" + (" and flex fwd, interleaved" if "flex" in fns
                                              else ""))
    mm = matmul_call()
    with torch.no_grad():
        times = interleaved({**fns, "matmul": mm}, cfg.repeats,
                            {"ours": 0.0 if cfg.quick else ROUND_SPAN})
    rec["ours"]["matmul_rounds_gflops"] = _gflops(times.pop("matmul"))
    for s_, t in times.items():
        if "error" in t:
            rec[s_]["error"] = t["error"]
        else:
            outs[s_] = t.pop("out")
            rec[s_].update(t)
    bm = fns = None
    progress.advance()
    gc.collect()
    progress.step(f"{case.name}: ours fwd+bwd")
    if "error" in rec["ours"]:
        rec["ours"]["fwd_bwd_error"] = "not run: the forward failed"
    else:
        try:
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            tt = interleaved(
                {"fb": lambda: torch.autograd.grad(ours(qg, kg, vg), (qg, kg, vg), grad),
                 "matmul": mm}, cfg.repeats, {"fb": 0.0 if cfg.quick else ROUND_SPAN})
            t = tt["fb"]
            if "error" in t:
                raise RuntimeError(t["error"])
            rec["ours"]["fwd_bwd_matmul_rounds_gflops"] = _gflops(tt["matmul"])
            rec["ours"]["fwd_bwd_s"] = t["median_s"]
            rec["ours"]["fwd_bwd_first_s"] = t["first_s"]
            rec["ours"]["fwd_bwd_samples_s"] = t["samples_s"]
        except Exception as e:
            rec["ours"]["fwd_bwd_error"] = short_error(e)
    progress.advance()
    gc.collect()

    # 3. SDPA with the dense bool mask
    progress.step(f"{case.name}: sdpa")
    if scores_bytes >= DENSE_LIMIT:
        rec["sdpa"]["error"] = "skipped: dense scores too large"
    else:
        try:
            t0 = time.perf_counter()
            m = content_mask if content_mask is not None else op.mask()
            rec["sdpa"]["build_s"] = (row["content_mask_s"] if content_mask is not None
                                      else time.perf_counter() - t0)
            m4 = sdpa_mask(m)
            rec["sdpa"]["note"] = ("dense bool mask; direct keys only (no summary tokens): "
                                   "not the same attention" if bp.summaries
                                   else "dense bool mask")
            with torch.no_grad():
                t, outs["sdpa"] = timed(lambda: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=m4, scale=scale), cfg.peer_repeats)
            rec["sdpa"].update(t)
            m = m4 = None
        except Exception as e:
            rec["sdpa"]["error"] = short_error(e)
    content_mask = None
    progress.advance()
    gc.collect()

    # 4. NATTEN on the neighborhood cases, checked against ours before it is timed
    progress.step(f"{case.name}: natten")
    if not case.natten:
        rec["natten"]["error"] = "n/a: not a neighborhood pattern"
        rec["natten"]["na"] = True
    else:
        natten, status = natten_status()
        if natten is None:
            rec["natten"]["error"] = f"natten: {status}"
        else:
            try:
                run, note = natten_call(natten, op, params, n, h, scale)
                rec["natten"]["note"] = note + " (block mask rebuilt inside every call)"
                rec["natten"]["build_s"] = None
                with torch.no_grad():
                    first = run(q, k, v)
                    against = "ours" if "ours" in outs else "sdpa" if "sdpa" in outs else None
                    if against:
                        row["check"][f"natten_vs_{against}"] = max_err(first, outs[against])
                    del first
                    t, outs["natten"] = timed(lambda: run(q, k, v), cfg.peer_repeats, warmup=0)
                rec["natten"].update(t)
            except Exception as e:
                rec["natten"]["error"] = short_error(e)
    progress.advance()

    # correctness, once per case
    if "ours" in outs:
        if bp.summaries:
            if scores_bytes < DENSE_LIMIT:
                try:  # the reference backend is a checker here, not a peer
                    with torch.no_grad():
                        ref = op(q, k, v, backend="reference", scale=scale)
                    row["check"]["ours_vs_reference"] = max_err(outs["ours"], ref)
                except Exception as e:
                    row["check"]["ours_error"] = short_error(e)
        elif "sdpa" in outs:
            row["check"]["ours_vs_sdpa"] = max_err(outs["ours"], outs["sdpa"])
        elif "flex" in outs:
            row["check"]["ours_vs_flex"] = max_err(outs["ours"], outs["flex"])
    if "flex" in outs and "sdpa" in outs and not bp.summaries:
        row["check"]["flex_vs_sdpa"] = max_err(outs["flex"], outs["sdpa"])
    outs.clear()
    gc.collect()

    # throughput (its share of the matmul peak is set once the run's peak is known) and
    # speedups
    for s in SYSTEMS:
        r = rec[s]
        useful = row.get("nnz_direct") if s == "sdpa" and bp.summaries else nnz
        if r.get("median_s") and useful:
            r["gflops"] = 4 * useful * d * b / r["median_s"] / 1e9
    # ours over the elements it computes (what flash.c computes: the tables' blocks less the
    # keys that no query of a 16-row tile attends): forward 4, forward + backward 14 flops
    # per element and head dimension (the backward recomputes the scores and makes dP, dQ,
    # dK and dV)
    tabs, r = rec["ours"].get("tables"), rec["ours"]
    row["mask_only"] = not bp.summaries and not bp.content_dependent
    if tabs and row["mask_only"]:
        comp = ((tabs.get("native_elements") or tabs["computed_elements"])
                * (h if st["head_tables"] == 1 else 1) * d * b)
        if r.get("median_s"):
            r["gflops_computed"] = 4 * comp / r["median_s"] / 1e9
            if r.get("matmul_rounds_gflops"):
                r["pct_rounds_computed"] = 100 * r["gflops_computed"] / r["matmul_rounds_gflops"]
        if r.get("fwd_bwd_s"):
            r["fwd_bwd_gflops_computed"] = 14 * comp / r["fwd_bwd_s"] / 1e9
            if r.get("fwd_bwd_matmul_rounds_gflops"):
                r["fwd_bwd_pct_rounds_computed"] = (100 * r["fwd_bwd_gflops_computed"]
                                                    / r["fwd_bwd_matmul_rounds_gflops"])
    for s in SYSTEMS[1:]:
        if rec["ours"].get("median_s") and rec[s].get("median_s"):
            rec[s]["ours_speedup"] = rec[s]["median_s"] / rec["ours"]["median_s"]
    return row


def _gflops(t: dict) -> float | None:
    """The matmul's GFLOP/s at the median of its calls in some rounds (None: it failed)."""
    return 2 * MATMUL_N**3 / t["median_s"] / 1e9 if t.get("median_s") else None


class _Refused(Exception):
    """A peer that declines the pattern up front (not a crash)."""


# ------------------------------------------------------------------ block tables at 1M


def big_tables(repeats: int = 3) -> list[dict]:
    """build_plan at N = 1,048,576 (the < 1 s target); FlexAttention is not attempted here:
    its create_block_mask already runs out of memory eagerly at 65,536."""
    import attndsl
    from attndsl.codegen.plan.tables import build_plan
    out = []
    for file, pattern, params in (("sliding.attn", "sliding_window",
                                   dict(N=BIG_N, window=4096)),
                                  ("power.attn", "power_attention", dict(N=BIG_N))):
        r: dict = {"pattern": pattern, "params": params}
        try:
            op = attndsl.compile(ROOT / "patterns" / file, pattern, **params)
            secs = []
            for _ in range(repeats):
                plan = build_plan(op.bound, BLOCK, BLOCK)
                secs.append(plan.build_seconds)
            st = plan.stats()
            r.update(build_s=statistics.median(secs), samples_s=secs,
                     needed_elements=st["needed_elements"],
                     block_table_bytes=st["block_table_bytes"])
        except Exception as e:
            r["error"] = short_error(e)
        out.append(r)
    return out


# ------------------------------------------------------------------ bf16 against fp32


def cpu_flags() -> dict:
    """The instruction sets that decide bf16 matmul speed, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    keys = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
            "amx_bf16")
    return {k: k in flags for k in keys}


BF16_ROUNDS = 9  # interleaved rounds of the bf16 / fp32 comparison (full runs)


def bf16_speed(cfg: Settings) -> dict:
    """Ours on sliding_window in fp32 and in bf16, forward and forward + backward, the four
    interleaved: the bf16 target depends on whether the CPU has bf16 matrix instructions."""
    import torch

    import attndsl
    case = next(c for c in CASES if c.name == "sliding_window")
    params = dict(case.quick if cfg.quick else case.full)
    r: dict = {"case": case.name, "params": params}
    try:
        op = attndsl.compile(ROOT / "patterns" / case.file, case.pattern, **params)
        op.options(block_q=cfg.block, block_k=cfg.block)
        g = torch.Generator().manual_seed(0)
        x32 = [torch.randn(cfg.batch, cfg.heads, op.bound.nq, cfg.head_dim, generator=g)
               for _ in range(4)]
        fns = {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            q, k, v, gr = (t.to(dt) for t in x32)
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

            def fwd(q=q, k=k, v=v):
                with torch.no_grad():
                    return op(q, k, v, backend="cpu")

            def fwd_bwd(qg=qg, kg=kg, vg=vg, gr=gr):
                return torch.autograd.grad(op(qg, kg, vg, backend="cpu"), (qg, kg, vg), gr)

            fns[f"{name}_fwd"], fns[f"{name}_fwd_bwd"] = fwd, fwd_bwd
        # a ratio of two medians on a shared machine: more rounds than a case's timing
        # (one noisy round moved it from 0.85x to 1.1x between runs)
        t = interleaved(fns, max(cfg.repeats, BF16_ROUNDS) if not cfg.quick else cfg.repeats)
        r["rounds"] = len(next(iter(t.values())).get("samples_s", []))
        for name, x in t.items():
            x.pop("out", None)
            r[name] = x
        for what in ("fwd", "fwd_bwd"):
            a, b = r[f"fp32_{what}"].get("samples_s"), r[f"bf16_{what}"].get("samples_s")
            if a and b and len(a) == len(b):
                # the pair of one round saw the same load: the median of the rounds' own
                # ratios, not a ratio of two medians that may come from different rounds
                ratios = [x / y for x, y in zip(a, b)]
                r[f"speedup_{what}"] = statistics.median(ratios)
                r[f"round_ratios_{what}"] = [round(x, 3) for x in ratios]
                r[f"ratio_of_medians_{what}"] = (r[f"fp32_{what}"]["median_s"]
                                                 / r[f"bf16_{what}"]["median_s"])
    except Exception as e:
        r["error"] = short_error(e)
    return r


# ------------------------------------------------------------------ irregular analysis

# BigBird-style (arXiv 2007.14062): per query block `random` key blocks chosen by a seeded
# integer hash of (query block, j), a window of blocks and global blocks. Defined here, not
# taken from patterns/, so that the benchmark does not move when the standard one changes.
BIGBIRD_SRC = """
pattern bigbird_hashed(N: int, block: int = 64, window: int = 3, globals: int = 2,
                       seed: int = 1) {
    space seq(N)
    let nb = cdiv(N, block)
    let qb = q // block
    let kb = k // block
    let h = ((qb * 40503 + (0, 1, 2) * 65599 + seed) % 65536 * 2654435761) % 4294967296
    attend abs(qb - kb) <= window // 2 or qb < globals or kb < globals
        or any((h >> 11) % nb == kb)
}
"""
ANALYSIS_SIZES = ((262144, 5.0, 60.0), (1 << 20, 30.0, 90.0))  # N, target s, give up after
ANALYSIS_QUICK = ((131072, 5.0, 60.0),)  # above reach.SAMPLE_LIMIT: one query followed
ANALYSIS_MEMORY = 2**30  # the 262,144-token target: growth of the peak resident set

_ANALYSIS_CHILD = """
import json, resource, sys, time
import attndsl
def status(key):  # bytes, from /proc/self/status (Linux)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
src, n = sys.argv[1], int(sys.argv[2])
op = attndsl.compile(src, N=n)
try:  # start the peak (VmHWM) afresh from here: the imports' peak is not the analysis's
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
except OSError:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
a = op.analyze(layers=12, progress=True)
sec = time.perf_counter() - t0
try:
    peak = status("VmHWM")
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": sec, "peak_rss_bytes": peak, "rss_before_bytes": base,
                  "growth_bytes": max(peak - base, 0), "method": a.method,
                  "full_coverage_layers": a.full_coverage_layers}))
"""


def irregular_analysis(quick: bool) -> list[dict]:
    """op.analyze(layers=12) (decomposition, 12 hops, the block tables it reports) of the
    BigBird-style pattern, each size in a fresh process (its peak memory is its own); the
    analysis's progress bar goes to this run's stderr."""
    import subprocess
    out = []
    for n, target, limit in (ANALYSIS_QUICK if quick else ANALYSIS_SIZES):
        r: dict = {"pattern": "bigbird_hashed", "N": n, "target_s": target, "limit_s": limit}
        try:
            p = subprocess.run([sys.executable, "-c", _ANALYSIS_CHILD, BIGBIRD_SRC, str(n)],
                               stdout=subprocess.PIPE, stderr=None, text=True, timeout=limit,
                               cwd=ROOT)
            if p.returncode:
                r["error"] = f"exit status {p.returncode}"
            else:
                r.update(json.loads(p.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            r["error"] = f"not finished after {limit:.0f} s (stopped)"
        except Exception as e:
            r["error"] = short_error(e)
        out.append(r)
    return out


def flex_big() -> dict:
    """--big: one compiled create_block_mask at N = 65,536 (sliding window 1024)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    import attndsl
    r: dict = {"pattern": "sliding_window", "params": dict(N=FLEX_BIG_N, window=1024),
               "how": "torch.compile(create_block_mask), one attempt (includes compilation)"}
    try:
        op = attndsl.compile(ROOT / "patterns" / "sliding.attn", "sliding_window",
                             N=FLEX_BIG_N, window=1024)
        ns = flex_namespace(op)
        build = torch.compile(create_block_mask)
        t0 = time.perf_counter()
        build(ns["mask_mod"], None, None, FLEX_BIG_N, FLEX_BIG_N, device="cpu")
        r["build_s"] = time.perf_counter() - t0
    except Exception as e:
        r["error"] = short_error(e)
    return r


# ------------------------------------------------------------------ report


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def size_label(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _status(seen: list) -> str:
    return "N/A" if not seen else "PASS" if all(seen) else "FAIL"


# issue 14's floors on ours / Flex forward; the other cases must only be faster (> 1.0x)
FLEX_FLOORS = {"sliding_window": 1.0, "power_attention": 1.0, "na2d_k13": 8.0, "na3d_k5": 8.0}
WASTE_CEILINGS = {"na2d_k13": 2.0, "na3d_k5": 2.5}
SECONDS_CEILINGS = {"dhsa": 2.0, "combiner_fixed": 1.0}


def targets(result: dict) -> list[tuple[str, str, str]]:
    """(status, target, detail) lines: PASS, FAIL, or N/A where nothing was measured."""
    rows, tables = result["rows"], result["tables_1m"]
    by = {r["case"]: r for r in rows}
    out = []

    def ours(name):
        return by.get(name, {}).get("systems", {}).get("ours", {})

    # faster than FlexAttention-CPU forward on every case, with issue 14's floors
    parts, seen = [], []
    for r in rows:
        o, flex = r.get("systems", {}).get("ours", {}), r.get("systems", {}).get("flex", {})
        floor = FLEX_FLOORS.get(r["case"])
        if not flex.get("median_s"):
            why = flex.get("error", r.get("error", "?"))
            parts.append(f"{r['case']} n/a (flex "
                         + ("refused" if why.startswith("refused") else "failed") + ")")
            continue
        if not o.get("median_s"):
            seen.append(False)
            parts.append(f"{r['case']} ours failed ({o.get('error', '?').split(':')[0]})")
            continue
        sp = flex["median_s"] / o["median_s"]
        seen.append(sp >= floor if floor else sp > 1.0)
        parts.append(f"{r['case']} {sp:.2f}x" + (f" (>= {floor:g}x)" if floor else ""))
    out.append((_status(seen), "forward faster than FlexAttention-CPU on every case (same "
                "run, interleaved): >= 1.0x 1D, >= 8x na2d k13 and na3d", "; ".join(parts)))

    # share of the matmul peak over the elements computed, mask-only cases: against the
    # matmul timed in the case's own rounds (the run's best peak comes from quiet moments
    # that the case may not have had; that share is shown beside it)
    for key, best, floor, what in (
            ("pct_rounds_computed", "pct_peak_computed", 70, "forward"),
            ("fwd_bwd_pct_rounds_computed", "fwd_bwd_pct_peak_computed", 50,
             "forward + backward")):
        parts, seen = [], []
        for r in rows:
            if not r.get("mask_only"):
                continue
            o = r["systems"]["ours"]
            pct = o.get(key)
            seen.append(pct is not None and pct >= floor)
            parts.append(f"{r['case']} " + ("not measured" if pct is None else f"{pct:.1f}%")
                         + (f" (of the run's best peak {o[best]:.1f}%)" if o.get(best) else ""))
        out.append((_status(seen), f">= {floor}% of the fp32 matmul peak, {what}, over the "
                    "elements computed, every mask-only case (the matmul timed in the case's "
                    "own rounds)", "; ".join(parts)))

    # seconds on the patterns Flex cannot express
    parts, seen = [], []
    for name, ceil in SECONDS_CEILINGS.items():
        if name not in by:
            continue
        t = ours(name).get("median_s")
        seen.append(t is not None and t < ceil)
        parts.append(f"{name} " + ("failed" if t is None else f"{t:.2f} s") + f" (< {ceil:g} s)")
    out.append((_status(seen), "dhsa N=16K forward under 2 s, combiner_fixed under 1 s",
                "; ".join(parts) or "cases not run"))

    # bf16 against fp32
    bf, flags = result.get("bf16") or {}, result["machine"].get("flags", {})
    has = flags.get("amx_bf16") or flags.get("avx512_bf16")
    need = 1.5 if has else 0.9
    sp = [bf.get("speedup_fwd"), bf.get("speedup_fwd_bwd")]
    isa = ("AMX-BF16" if flags.get("amx_bf16") else "AVX512-BF16" if has
           else "no bf16 matrix instructions (no avx512_bf16, no amx_bf16)")
    out.append(("N/A" if not bf else _status([x is not None and x >= need for x in sp]),
                f"bf16 vs fp32 ({isa}): " + ("forward and backward >= 1.5x faster" if has
                                             else "equal speed (>= 0.9x)"),
                bf.get("error") or "; ".join(f"{w} " + ("-" if x is None else f"{x:.2f}x")
                                             for w, x in zip(("fwd", "fwd+bwd"), sp))))

    # waste of the block tables on the grid cases
    parts, seen = [], []
    for name, ceil in WASTE_CEILINGS.items():
        tabs = ours(name).get("tables")
        if name not in by:
            continue
        seen.append(bool(tabs) and tabs["waste"] <= ceil)
        parts.append(f"{name} " + (f"{tabs['waste']:.2f}" if tabs else "no tables")
                     + f" (<= {ceil:g})")
    out.append((_status(seen), "computed / needed elements: na2d k13 <= 2.0, na3d k5 <= 2.5",
                "; ".join(parts) or "cases not run"))

    # analysis of the BigBird-style pattern
    parts, seen = [], []
    for a in result.get("analysis") or []:
        ok = "seconds" in a and a["seconds"] < a["target_s"]
        if a["N"] == ANALYSIS_SIZES[0][0] or (result["config"]["quick"]
                                              and a["N"] == ANALYSIS_QUICK[0][0]):
            ok = ok and a.get("growth_bytes", 1 << 62) < ANALYSIS_MEMORY
            mem = f", {a['growth_bytes'] / 2**20:.0f} MiB" if "growth_bytes" in a else ""
        else:
            mem = ""
        seen.append(ok)
        parts.append(f"N={a['N']:,} " + (f"{a['seconds']:.1f} s{mem}" if "seconds" in a
                                         else a.get("error", "?"))
                     + f" (< {a['target_s']:g} s)")
    out.append((_status(seen), "BigBird-style analysis (12 layers): 262,144 tokens under 5 s "
                "and 1 GiB, 1,048,576 under 30 s", "; ".join(parts)))

    # block tables for N = 1,048,576 under a second
    ok = [t.get("build_s") is not None and t["build_s"] < 1.0 for t in tables]
    detail = "; ".join(f"{t['pattern']} " + (f"{t['build_s']:.3f} s" if "build_s" in t
                                            else t.get("error", "?")) for t in tables)
    out.append((_status(ok), f"block tables for N={BIG_N:,} in under 1 s", detail))
    return out


def markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    peak = result["peak"]
    lines = [f"# attndsl CPU benchmark: {m['cpu']}", ""]
    if cfg["quick"]:
        lines += ["**Quick run (small sizes): a smoke test; the targets are for the full "
                  "sizes.**", ""]
    lines += [
        f"{m['logical_cores']} logical cores ({m['physical_cores'] or '?'} physical), torch "
        f"{m['torch']} with {m['torch_threads']} threads, triton {m['triton']}, natten "
        f"{m['natten']}. fp32 matmul peak {peak.get('gflops', 0):.1f} GFLOP/s "
        f"({peak.get('n')}^3, best of {peak.get('repeats')} at the start and again at the "
        "end of the run).", "",
        "CPU flags: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                  for k, v in m.get("flags", {}).items())
        + f"; torch CPU capability {m.get('cpu_capability', '?')}.", "",
        f"B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, fp32; ours: "
        + (f"{cfg['block']}x{cfg['block']} blocks" if cfg.get('block') else
           "the block sizes and token orders the CPU planner chose (notes)")
        + f". fwd: ours and flex are timed in turn, {cfg['repeats']} rounds, so both see "
        + ("the same load, one call each a round; fwd+bwd: "
           f"{cfg['repeats']} calls; " if cfg.get("quick") else
           f"the same load, ours making as many calls a round as fill {ROUND_SPAN} s (at most "
           f"{CALLS_CAP}; a 20 ms call is not judged on five samples), flex one; fwd+bwd: "
           f"{cfg['repeats']} rounds with the matmul, as many calls a round as fill "
           f"{ROUND_SPAN} s; ")
        + f"sdpa, natten: {cfg['peer_repeats']} calls; medians, after warm-up calls. "
        "GFLOP/s = 4 * nnz * D * heads / time (attended pairs only); % comp = the same over "
        "the elements ours computes (its waste included: its blocks less the keys that no "
        "query of a 16-row tile attends, which it skips, as the kernel counts them), fwd+bwd "
        "counted as 14 flops per element and D. % comp* = the "
        f"same against the fp32 matmul ({MATMUL_N}^3) timed "
        "once a round in the case's own rounds (median), so that the load the case met falls "
        "on both; issue 14's targets are judged on it. speedup = peer time / ours. build = "
        "block tables (ours), create_block_mask (flex), op.mask() (sdpa).", "",
        "| case | size | system | fwd ms | GFLOP/s | % peak | % comp | % comp* | ours speedup "
        "| build s | fwd+bwd ms | fwd+bwd % comp | fwd+bwd % comp* | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        label = size_label(row["params"])
        if "error" in row:
            lines.append(f"| {row['case']} | {label} | all | - | - | - | - | - | - | - | - | "
                         f"{row['error']} |")
            continue
        for s in SYSTEMS:
            r = row["systems"][s]
            if r.get("na"):
                continue
            note = r.get("error") or r.get("note", "")
            if s == "ours":
                tabs = r.get("tables")
                if tabs and math.isfinite(tabs["waste"]):
                    keys = tabs.get("order_k", tabs["order_q"])
                    sides = (tabs["order_q"] if keys == tabs["order_q"] else
                             f"queries {tabs['order_q']}, keys {keys}")
                    blocks = (f"{tabs['block_q']}x{tabs['block_k']} blocks, "
                              if "block_q" in tabs else "")
                    fe = tabs.get("native_elements")
                    fw = (f" (keys skipped: {fe / tabs['needed_elements']:.2f})"
                          if fe and fe != tabs["computed_elements"] else "")
                    note = (note + "; " if note else "") + (
                        f"waste {tabs['waste']:.2f}{fw}, {blocks}{sides}")
                if r.get("fwd_bwd_error") and "error" not in r:
                    note += f"; fwd+bwd: {r['fwd_bwd_error']}"
                if r.get("build_error"):
                    note += f"; tables: {r['build_error']}"
            if r.get("samples_s") and len(r["samples_s"]) > 1:
                note += ("; " if note else "") + (f"fwd ms range {_spread(r)} "
                                                   f"({len(r['samples_s'])} calls)")
            if s == "flex" and r.get("first_s"):
                note += f"; first call {r['first_s']:.1f} s (compiles)"
            fb = r.get("fwd_bwd_s")
            lines.append(
                f"| {row['case']} | {label} | {s} | "
                f"{fmt(r.get('median_s') and r['median_s'] * 1e3, '.2f')} | "
                f"{fmt(r.get('gflops'), '.1f')} | {fmt(r.get('pct_peak'), '.1f')} | "
                f"{fmt(r.get('pct_peak_computed'), '.1f')} | "
                f"{fmt(r.get('pct_rounds_computed'), '.1f')} | "
                f"{fmt(r.get('ours_speedup'), '.2f')} | {fmt(r.get('build_s'), '.4f')} | "
                f"{fmt(fb and fb * 1e3, '.2f')} | "
                f"{fmt(r.get('fwd_bwd_pct_peak_computed'), '.1f')} | "
                f"{fmt(r.get('fwd_bwd_pct_rounds_computed'), '.1f')} | "
                f"{note.replace('|', '/')} |")
    lines += ["", "Correctness (max abs error, fp32, same inputs):", ""]
    for row in result["rows"]:
        checks = row.get("check") or {}
        checks = dict(sorted(checks.items(), key=lambda kv: not kv[0].startswith("ours")))
        text = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k}: {v}"
                         for k, v in checks.items()) or "not checked (no two systems ran)"
        lines.append(f"- {row['case']}: {text}")
    lines += ["", f"Block tables at N = {BIG_N:,} (build_plan, {BLOCK}x{BLOCK} blocks, median "
              "of 3); FlexAttention's create_block_mask at this size is not attempted:", ""]
    for t in result["tables_1m"]:
        lines.append(f"- {t['pattern']} {size_label(t['params'])}: " + (
            f"{t['build_s']:.3f} s, {t['needed_elements']:,} attended pairs, "
            f"{t['block_table_bytes']:,} table bytes" if "build_s" in t else t["error"]))
    fb = result.get("flex_big")
    if fb:
        lines.append(f"- flex {fb['how']} at N = {FLEX_BIG_N:,}: " + (
            f"{fb['build_s']:.2f} s" if "build_s" in fb else fb["error"]))
    else:
        lines.append(f"- flex create_block_mask at N = {FLEX_BIG_N:,}: not attempted (eager "
                     "runs out of memory; --big tries the compiled one once)")
    bf = result.get("bf16") or {}
    if bf:
        lines += ["", f"bf16 against fp32 (ours, {bf['case']} {size_label(bf['params'])}, "
                  f"the four interleaved, {bf.get('rounds', '?')} rounds; the speedup is the "
                  "median of the rounds' own fp32 / bf16 ratios):", ""]
        if "error" in bf:
            lines.append(f"- {bf['error']}")
        for what in ("fwd", "fwd_bwd"):
            a, b = bf.get(f"fp32_{what}", {}), bf.get(f"bf16_{what}", {})
            if a.get("median_s") and b.get("median_s"):
                lines.append(f"- {what.replace('_', '+')}: fp32 {a['median_s'] * 1e3:.1f} ms "
                             f"{_spread(a)}, bf16 {b['median_s'] * 1e3:.1f} ms {_spread(b)}: "
                             f"bf16 {bf[f'speedup_{what}']:.2f}x (rounds "
                             f"{_range(bf.get(f'round_ratios_{what}'))}; ratio of the "
                             f"medians {bf.get(f'ratio_of_medians_{what}', 0):.2f}x)")
    an = result.get("analysis") or []
    if an:
        lines += ["", "Analysis of a BigBird-style pattern (hashed random key blocks, window, "
                  "globals; bench/cpu_bench.py BIGBIRD_SRC): op.analyze(layers=12) in a fresh "
                  "process, peak resident-set growth over the process before the call:", ""]
        for a in an:
            lines.append(f"- N={a['N']:,}: " + (
                f"{a['seconds']:.1f} s, +{a['growth_bytes'] / 2**20:.0f} MiB (peak RSS "
                f"{a['peak_rss_bytes'] / 2**20:.0f} MiB)" if "seconds" in a else a["error"]))
    lines += ["", "Targets:", ""]
    for status, what, detail in result["targets"]:
        lines.append(f"- {status}: {what} ({detail})")
    return "\n".join(lines) + "\n"


def _spread(t: dict) -> str:
    xs = t.get("samples_s") or []
    return f"[{min(xs) * 1e3:.1f}..{max(xs) * 1e3:.1f}]" if xs else ""


def _range(xs) -> str:
    return f"{min(xs):.2f}..{max(xs):.2f}x" if xs else "-"


def chart(result: dict, path: Path) -> None:
    """Forward time per system per case, log scale; an x marks a system that did not run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "systems" in r]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4.5))
    width = 0.8 / len(SYSTEMS)
    missing = []
    for i, s in enumerate(SYSTEMS):
        xs, ys = [], []
        for j, r in enumerate(rows):
            t = r["systems"][s].get("median_s")
            x = j + (i - (len(SYSTEMS) - 1) / 2) * width
            if t:
                xs.append(x)
                ys.append(t * 1e3)
            elif not r["systems"][s].get("na"):
                missing.append(x)
        ax.bar(xs, ys, width, label=s, color=f"C{i}")
    ax.set_yscale("log")
    bottom = ax.get_ylim()[0]
    for x in missing:  # failed, refused or skipped: marked, so a gap is not read as fast
        ax.text(x, bottom, "x", ha="center", va="bottom", fontsize=9, color="0.3")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["case"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("forward time, ms (log)")
    ax.set_title(f"attndsl CPU benchmark, {result['machine']['cpu']}"
                 + (" (quick)" if result["config"]["quick"] else ""), fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ entry points


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed flags (from this script or `attndsl bench`)."""
    try:
        cases = select_cases(getattr(args, "cases", None))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    repeats = getattr(args, "repeats", 5)
    peer = getattr(args, "peer_repeats", None)
    peer = min(3, repeats) if peer is None else peer
    if repeats < 1 or peer < 1:
        print("error: --repeats and --peer-repeats must be at least 1", file=sys.stderr)
        return 1
    quick = bool(getattr(args, "quick", False))
    cfg = Settings(quick=quick, repeats=repeats, peer_repeats=peer)
    import torch

    progress = Progress(total=5 + 5 * len(cases) + bool(getattr(args, "big", False)))
    progress.step("fp32 matmul peak")
    peaks = [matmul_peak()]
    progress.advance()
    out_dir = None if getattr(args, "no_write", False) else Path(
        getattr(args, "out", None) or RESULTS)
    rows = []
    for c in cases:
        rows.append(run_case(c, cfg, progress))
        if out_dir is not None:  # a long run on a busy machine keeps what it has measured
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "cpu_partial.json").write_text(
                json.dumps({"rows": rows, "machine": machine_info(), "peak_start": peaks[0]},
                           indent=2, default=str) + "\n")
    progress.step(f"block tables at N={BIG_N:,}")
    tables = big_tables()
    progress.advance()
    progress.step("bf16 against fp32 (sliding_window)")
    bf16 = bf16_speed(cfg)
    progress.advance()
    progress.step("BigBird-style analysis (12 layers)")
    analysis = irregular_analysis(quick)
    progress.advance()
    fbig = None
    if getattr(args, "big", False):
        progress.step(f"flex compiled create_block_mask at N={FLEX_BIG_N:,}")
        fbig = flex_big()
        progress.advance()
    # measured again at the end, best of both: on a shared machine one sample can be low
    progress.step("fp32 matmul peak (again)")
    peaks.append(matmul_peak())
    progress.advance()
    progress.close()
    peak = dict(max(peaks, key=lambda p: p["gflops"]),
                samples_gflops=[round(p["gflops"], 2) for p in peaks])
    for row in rows:
        for r in row.get("systems", {}).values():
            for key in ("gflops", "gflops_computed", "fwd_bwd_gflops_computed"):
                if r.get(key):
                    r[key.replace("gflops", "pct_peak")] = 100 * r[key] / peak["gflops"]
    result = {
        "machine": machine_info(), "peak": peak, "rows": rows, "tables_1m": tables,
        "flex_big": fbig, "bf16": bf16, "analysis": analysis,
        "config": {"quick": quick, "repeats": repeats, "peer_repeats": peer, "batch": BATCH,
                   "heads": HEADS, "head_dim": HEAD_DIM, "block": cfg.block, "dtype": "float32",
                   "cases": [c.name for c in cases], "torch_threads": torch.get_num_threads()},
    }
    result["targets"] = targets(result)
    text = markdown(result)
    print(text, end="")
    if not getattr(args, "no_write", False):
        out = Path(getattr(args, "out", None) or RESULTS)
        out.mkdir(parents=True, exist_ok=True)
        m = result["machine"]
        stem = f"cpu_{slug(m['cpu'])}-{m['logical_cores']}c" + ("_quick" if quick else "")
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        written = [out / f"{stem}.md", out / f"{stem}.json"]
        try:
            chart(result, out / f"{stem}.png")
            written.append(out / f"{stem}.png")
        except Exception as e:
            print(f"note: no chart ({short_error(e)})", file=sys.stderr)
        for p in written:
            print(f"wrote {p}")
        (out / "cpu_partial.json").unlink(missing_ok=True)
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""CPU benchmark (issue 5): attndsl's backend="cpu" against FlexAttention, SDPA and NATTEN.

Every system runs in one process on the same fp32 tensors (B=1, 4 heads, D=64), so the
numbers are side by side on one machine:

  ours    op(q, k, v, backend="cpu") with 64 x 64 blocks; build = build_plan(op.bound)
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
        "triton": triton_ver, "natten": nat, "python": platform.python_version(),
        "platform": platform.platform(), "host": platform.node(),
    }


def matmul_peak(n: int = MATMUL_N, repeats: int = 5) -> dict:
    """Best fp32 GFLOP/s of an n x n @ n x n matmul: the ceiling the % peak column uses."""
    import torch
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    best = min(_once(lambda: a @ b) for _ in range(repeats))
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
    block: int = BLOCK


def run_case(case: Case, cfg: Settings, progress: Progress) -> dict:
    """Time ours and each peer on one case; check correctness once; never raise."""
    import torch
    import torch.nn.functional as F

    import attndsl
    from attndsl.codegen.plan.tables import build_plan
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
        plan = build_plan(bp, cfg.block, cfg.block)
        st = plan.stats()
        rec["ours"]["build_s"] = plan.build_seconds
        rec["ours"]["tables"] = {k_: st[k_] for k_ in (
            "full_blocks", "partial_blocks", "computed_elements", "needed_elements", "waste",
            "block_table_bytes", "order_q")}
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

    # 1. ours, forward (no graph) and forward + backward
    def ours(a, b_, c):
        return op(a, b_, c, backend="cpu", scale=scale)

    progress.step(f"{case.name}: ours fwd")
    try:
        with torch.no_grad():
            t, outs["ours"] = timed(lambda: ours(q, k, v), cfg.repeats)
        rec["ours"].update(t)
    except Exception as e:
        rec["ours"]["error"] = short_error(e)
    progress.advance()
    progress.step(f"{case.name}: ours fwd+bwd")
    if "error" in rec["ours"]:
        rec["ours"]["fwd_bwd_error"] = "not run: the forward failed"
    else:
        try:
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            t, _ = timed(lambda: torch.autograd.grad(ours(qg, kg, vg), (qg, kg, vg), grad),
                         cfg.repeats)
            rec["ours"]["fwd_bwd_s"] = t["median_s"]
            rec["ours"]["fwd_bwd_first_s"] = t["first_s"]
        except Exception as e:
            rec["ours"]["fwd_bwd_error"] = short_error(e)
    progress.advance()
    gc.collect()

    # 2. FlexAttention, compiled, on the block mask of our exported mask_mod
    progress.step(f"{case.name}: flex (compiling)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask
        try:
            ns = flex_namespace(op)
        except attndsl.UnsupportedError as e:
            raise _Refused(f"refused by attndsl's flex export: {short_error(e)}") from None
        t0 = time.perf_counter()
        bm = create_block_mask(ns["mask_mod"], None, h if bp.head_dependent else None, n,
                               bp.nk, device="cpu")
        rec["flex"]["build_s"] = time.perf_counter() - t0
        rec["flex"]["note"] = "torch.compile(flex_attention), BLOCK_SIZE 128, no_grad"
        flex = compiled_flex()
        with torch.no_grad():
            t, outs["flex"] = timed(lambda: flex(q, k, v, block_mask=bm,
                                                 score_mod=ns["score_mod"], scale=scale),
                                    cfg.peer_repeats)
        rec["flex"].update(t)
        bm = None  # free the block mask before the next system
    except _Refused as e:
        rec["flex"]["error"] = str(e)
    except Exception as e:
        rec["flex"]["error"] = short_error(e)
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
    for s in SYSTEMS[1:]:
        if rec["ours"].get("median_s") and rec[s].get("median_s"):
            rec[s]["ours_speedup"] = rec[s]["median_s"] / rec["ours"]["median_s"]
    return row


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


def targets(rows: list[dict], tables: list[dict]) -> list[tuple[str, str, str]]:
    """(status, target, detail) lines: PASS, FAIL, or N/A where nothing was measured."""
    by = {r["case"]: r for r in rows}
    out = []

    # faster than FlexAttention-CPU forward on every case
    parts, bad, seen = [], False, 0
    for r in rows:
        ours, flex = r.get("systems", {}).get("ours", {}), r.get("systems", {}).get("flex", {})
        if not flex.get("median_s"):
            why = flex.get("error", r.get("error", "?"))
            parts.append(f"{r['case']} n/a (flex "
                         + ("refused" if why.startswith("refused") else "failed") + ")")
            continue
        seen += 1
        if not ours.get("median_s"):
            bad = True
            parts.append(f"{r['case']} ours failed ({ours.get('error', '?').split(':')[0]})")
        else:
            sp = flex["median_s"] / ours["median_s"]
            bad |= sp <= 1
            parts.append(f"{r['case']} {sp:.2f}x")
    out.append(("N/A" if not seen else "FAIL" if bad else "PASS",
                "faster than FlexAttention-CPU forward on every case", "; ".join(parts)))

    # na2d kernel 13 at least 20x faster than flex
    r = by.get("na2d_k13")
    if r is None:
        out.append(("N/A", "na2d kernel 13 >= 20x faster than flex", "case not run"))
    else:
        sp = r["systems"]["flex"].get("ours_speedup")
        out.append(("N/A" if sp is None else "PASS" if sp >= 20 else "FAIL",
                    "na2d kernel 13 >= 20x faster than flex",
                    "not measured" if sp is None else f"{sp:.1f}x"))

    # >= 30% of the matmul peak on sliding_window and power_attention
    parts, status = [], []
    for name in ("sliding_window", "power_attention"):
        r = by.get(name)
        pct = r["systems"]["ours"].get("pct_peak") if r else None
        parts.append(f"{name} " + ("not run" if r is None else "not measured" if pct is None
                                   else f"{pct:.1f}%"))
        if r is not None:
            status.append(pct is not None and pct >= 30)
    out.append(("N/A" if not status else "PASS" if all(status) else "FAIL",
                ">= 30% of fp32 matmul peak on sliding_window and power_attention",
                "; ".join(parts)))

    # block tables for N = 1,048,576 under a second
    ok = [t.get("build_s") is not None and t["build_s"] < 1.0 for t in tables]
    detail = "; ".join(f"{t['pattern']} " + (f"{t['build_s']:.3f} s" if "build_s" in t
                                            else t.get("error", "?")) for t in tables)
    out.append(("N/A" if not tables else "PASS" if all(ok) else "FAIL",
                f"block tables for N={BIG_N:,} in under 1 s", detail))
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
        f"B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, fp32; ours "
        f"{cfg['block']}x{cfg['block']} blocks. fwd: median of {cfg['repeats']} (ours) / "
        f"{cfg['peer_repeats']} (peers) calls after one warm-up call. GFLOP/s = 4 * nnz * D * "
        "heads / time (attended pairs only). speedup = peer time / ours. build = block "
        "tables (ours), create_block_mask (flex), op.mask() (sdpa).", "",
        "| case | size | system | fwd ms | GFLOP/s | % peak | ours speedup | build s "
        "| fwd+bwd ms | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        label = size_label(row["params"])
        if "error" in row:
            lines.append(f"| {row['case']} | {label} | all | - | - | - | - | - | - | "
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
                    note = (note + "; " if note else "") + (
                        f"waste {tabs['waste']:.2f}, {tabs['order_q']}")
                if r.get("fwd_bwd_error") and "error" not in r:
                    note += f"; fwd+bwd: {r['fwd_bwd_error']}"
                if r.get("build_error"):
                    note += f"; tables: {r['build_error']}"
            if s == "flex" and r.get("first_s"):
                note += f"; first call {r['first_s']:.1f} s (compiles)"
            fb = r.get("fwd_bwd_s")
            lines.append(
                f"| {row['case']} | {label} | {s} | "
                f"{fmt(r.get('median_s') and r['median_s'] * 1e3, '.2f')} | "
                f"{fmt(r.get('gflops'), '.1f')} | {fmt(r.get('pct_peak'), '.1f')} | "
                f"{fmt(r.get('ours_speedup'), '.2f')} | {fmt(r.get('build_s'), '.4f')} | "
                f"{fmt(fb and fb * 1e3, '.2f')} | {note.replace('|', '/')} |")
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
    lines += ["", "Targets:", ""]
    for status, what, detail in result["targets"]:
        lines.append(f"- {status}: {what} ({detail})")
    return "\n".join(lines) + "\n"


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

    progress = Progress(total=3 + 5 * len(cases) + bool(getattr(args, "big", False)))
    progress.step("fp32 matmul peak")
    peaks = [matmul_peak()]
    progress.advance()
    rows = [run_case(c, cfg, progress) for c in cases]
    progress.step(f"block tables at N={BIG_N:,}")
    tables = big_tables()
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
            if r.get("gflops"):
                r["pct_peak"] = 100 * r["gflops"] / peak["gflops"]
    result = {
        "machine": machine_info(), "peak": peak, "rows": rows, "tables_1m": tables,
        "flex_big": fbig,
        "config": {"quick": quick, "repeats": repeats, "peer_repeats": peer, "batch": BATCH,
                   "heads": HEADS, "head_dim": HEAD_DIM, "block": BLOCK, "dtype": "float32",
                   "cases": [c.name for c in cases], "torch_threads": torch.get_num_threads()},
    }
    result["targets"] = targets(rows, tables)
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
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

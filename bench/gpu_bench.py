"""GPU benchmark: attndsl's block-sparse Triton kernels against FlexAttention and SDPA.

All three systems run in one process on the same bf16 tensors, so the comparison is side by
side: attndsl's `op(q, k, v, backend="triton")`, `torch.compile(flex_attention)` with a
BlockMask from the mask_mod attndsl exports (codegen/flex.py), and PyTorch's
`scaled_dot_product_attention` with the dense bool mask from `op.mask()` (only while the
mask has at most 2**28 elements). Times are medians of CUDA-event timings after warm-up;
a failing peer is recorded with its exception and the run goes on.

    python bench/gpu_bench.py [--quick] [--cases sliding_window,na2d] [--repeats 20]
    python bench/gpu_bench.py --smoke     # no GPU needed: plumbing check in the interpreter

Results: a markdown table (printed and written to bench/results/gpu_<device>.md) and JSON
(bench/results/gpu_<device>.json) with the torch and triton versions and the device name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DENSE_LIMIT = 2**28  # SDPA's dense bool mask: N * N elements at most (256 MiB)
SYSTEMS = ("ours", "flex", "sdpa")

# name -> (file, pattern, parameter sets from the smallest to the largest)
CASES = {
    "sliding_window": ("sliding.attn", "sliding_window",
                       [dict(N=n, window=1024, causal=True) for n in (4096, 16384, 65536)]),
    "power_attention": ("power.attn", "power_attention",
                        [dict(N=n) for n in (4096, 16384, 65536)]),
    "na2d": ("neighborhood.attn", "na2d",
             [dict(H=s, W=s, kernel=13) for s in (64, 128, 256)]),
    "na3d": ("neighborhood.attn", "na3d", [dict(T=16, H=32, W=32, kernel=5)]),
}
SMOKE_CASES = {
    "sliding_window": ("sliding.attn", "sliding_window", [dict(N=64, window=16, causal=True)]),
    "na2d": ("neighborhood.attn", "na2d", [dict(H=8, W=8, kernel=3)]),
}


@dataclass
class Config:
    """What differs between the GPU run and the CPU smoke run."""

    device: str
    dtype: object
    block: int  # attndsl's block_q = block_k
    flex_block: int  # FlexAttention's BLOCK_SIZE
    compile_flex: bool
    warmup: int
    repeats: int
    heads: int = 4
    head_dim: int = 64
    batch: int = 1
    smoke: bool = False
    flex_fn: object = None
    extra: dict = field(default_factory=dict)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the smallest size of each case")
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--repeats", type=int, default=20, help="timed samples per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    ap.add_argument("--smoke", action="store_true",
                    help="without CUDA: tiny fp32 run in TRITON_INTERPRET=1 to check the "
                         "plumbing (timings meaningless)")
    args = ap.parse_args(argv)
    if args.cases:
        chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in chosen if c not in CASES]
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
        args.cases = chosen
    return args


def short_error(e: BaseException) -> str:
    """Exception type and first line: enough to tell OOM from unsupported from a bug."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:240] if lines else ''}".rstrip(": ")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# -- timing

def time_cuda(fn, cfg: Config) -> float:
    """Median milliseconds per call. Each sample times enough back-to-back calls to last
    about a millisecond, so launch jitter does not dominate short kernels."""
    import torch
    for _ in range(cfg.warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    inner = max(1, min(50, int(1.0 / max(start.elapsed_time(end), 1e-3))))
    samples = []
    for _ in range(cfg.repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def time_once(fn, cfg: Config) -> float:
    """Smoke mode: one wall-clock call (the interpreter's timings mean nothing)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fwd, fwd_bwd, cfg: Config) -> dict:
    """fwd and fwd+bwd milliseconds, each recorded or failed on its own."""
    import torch
    timer = time_once if cfg.smoke else time_cuda
    out = {}
    for key, fn in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
        try:
            out[key] = timer(fn, cfg)
        except Exception as e:  # a peer that fails must not end the run
            out[key] = None
            out.setdefault("error", short_error(e))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out


def fwd_and_bwd(attend, q, k, v, grad):
    """Two closures over one attention callable: forward only (no graph recorded) and
    forward plus backward to q, k, v (autograd.grad, so no .grad accumulation is timed)."""
    import torch
    qd, kd, vd = (t.detach() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            return attend(qd, kd, vd)

    def fwd_bwd():
        out = attend(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad)

    return fwd, fwd_bwd


# -- one case at one size

def dense_mask_4d(op, n: int, device: str):
    """op.mask() as a [1, 1|H, N, N] bool tensor for SDPA, or None when it is too large."""
    if n * n > DENSE_LIMIT:
        return None
    m = op.mask().to(device)
    return m.view(1, 1, n, n) if m.dim() == 2 else m.unsqueeze(0)


def flex_block_mask(op, cfg: Config, rec: dict):
    """The BlockMask from attndsl's exported mask_mod; times create_block_mask. The
    exporter's eager helper materialises the dense mask, so when it fails (out of memory at
    large N) the compiled create_block_mask is used and both outcomes are recorded."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from attndsl.codegen.flex import flex_source
    ns: dict = {}
    exec(compile(flex_source(op.bound), f"<flex:{op.name}>", "exec"), ns)
    bp = op.bound

    def sync():
        if cfg.device == "cuda":
            torch.cuda.synchronize()

    def timed(build, least=1):
        times, bm = [], None
        for _ in range(max(least, 1 if cfg.smoke else 3)):
            sync()
            t0 = time.perf_counter()
            bm = build()
            sync()
            times.append(time.perf_counter() - t0)
            if len(times) >= least and times[-1] > 5.0:  # slow builds: enough samples
                break
        return bm, times

    try:
        bm, times = timed(lambda: ns["block_mask"](device=cfg.device,
                                                     BLOCK_SIZE=cfg.flex_block))
        rec["build_s"] = statistics.median(times)
        rec["build_first_s"] = times[0]
        rec["build_how"] = "create_block_mask (eager)"
    except Exception as e:
        rec["build_eager_error"] = short_error(e)
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        compiled = torch.compile(create_block_mask)
        bm, times = timed(lambda: compiled(ns["mask_mod"], None, bp.heads, bp.nq, bp.nk,
                                           device=cfg.device, BLOCK_SIZE=cfg.flex_block),
                          least=2)
        rec["build_first_s"] = times[0]  # includes torch.compile
        rec["build_s"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
        rec["build_how"] = "torch.compile(create_block_mask) after eager failed"
    try:
        rec["sparsity_pct"] = round(float(bm.sparsity()), 2)
    except Exception:
        pass
    return bm, ns["score_mod"]


def run_case(name: str, file: str, pattern: str, params: dict, cfg: Config,
             check: bool) -> dict:
    """Time the three systems on one pattern and size; check against SDPA if asked."""
    import torch

    import attndsl
    row: dict = {"case": name, "file": file, "pattern": pattern, "params": params}
    rec = {s: {} for s in SYSTEMS}
    row["systems"] = rec
    try:
        op = attndsl.compile(ROOT / "patterns" / file, pattern, **params)
        op.options(block_q=cfg.block, block_k=cfg.block)
    except Exception as e:
        row["error"] = short_error(e)
        return row
    n = op.bound.nq
    b, h, d = cfg.batch, cfg.heads, cfg.head_dim
    row.update(N=n)
    gen = torch.Generator(device=cfg.device).manual_seed(0)
    q, k, v, grad = (torch.randn(b, h, n, d, device=cfg.device, dtype=cfg.dtype,
                                 generator=gen) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = 1.0 / math.sqrt(d)

    # 1. ours (the block tables are built by stats(), before any timing)
    nnz_total = None
    try:
        stats = op.stats()
        per_table = stats["needed_elements"]
        nnz_total = per_table * (h if stats.get("head_tables", 1) == 1 else 1) * b
        row.update(nnz_per_head=per_table, density=per_table / (op.bound.nq * op.bound.nk),
                   stats=stats)
        rec["ours"]["build_s"] = stats["build_seconds"]
        rec["ours"]["note"] = (f"waste {stats['waste']:.2f}, {stats['full_blocks']} full + "
                               f"{stats['partial_blocks']} partial blocks, {stats['order_q']}")
        rec["ours"].update(measure(*fwd_and_bwd(
            lambda a, b_, c: op(a, b_, c, backend="triton", scale=scale), q, k, v, grad),
            cfg))
    except Exception as e:
        rec["ours"]["error"] = short_error(e)

    # 2. FlexAttention
    flex = None
    rec["flex"]["note"] = (f"{'compiled' if cfg.compile_flex else 'eager'}, BLOCK_SIZE "
                           f"{cfg.flex_block}")
    try:
        bm, score_mod = flex_block_mask(op, cfg, rec["flex"])
        flex = flex_with(cfg.flex_fn, bm, score_mod, scale)
        rec["flex"].update(measure(*fwd_and_bwd(flex, q, k, v, grad), cfg))
    except Exception as e:
        rec["flex"]["error"] = short_error(e)

    # 3. SDPA with the dense mask
    sdpa, mask = None, None
    if n * n > DENSE_LIMIT:
        rec["sdpa"]["skipped"] = "skipped: dense mask too large"
    else:
        try:
            mask = dense_mask_4d(op, n, cfg.device)
            sdpa = sdpa_with(mask, scale)
            rec["sdpa"].update(measure(*fwd_and_bwd(sdpa, q, k, v, grad), cfg))
        except Exception as e:
            rec["sdpa"]["error"] = short_error(e)
            sdpa = None
    rec["sdpa"]["note"] = rec["sdpa"].get("skipped", "dense bool mask")

    # throughput and speedups
    for sysname in SYSTEMS:
        r = rec[sysname]
        if r.get("fwd_ms") and nnz_total:
            r["tflops_fwd"] = 4 * nnz_total * d / (r["fwd_ms"] * 1e-3) / 1e12
    ours = rec["ours"]
    for sysname in ("flex", "sdpa"):
        r = rec[sysname]
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if ours.get(key) and r.get(key):
                r["ours_speedup_" + key[:-3]] = r[key] / ours[key]

    if check and mask is not None:
        row["check"] = correctness(op, q, k, v, grad, mask, scale, flex, sdpa)
    return row


def flex_with(flex_attention, block_mask, score_mod, scale):
    """FlexAttention bound to one BlockMask, with the same signature as the other systems."""
    def flex(a, b, c):
        return flex_attention(a, b, c, score_mod=score_mod, block_mask=block_mask,
                              scale=scale)
    return flex


def sdpa_with(mask, scale):
    """SDPA bound to one dense mask, with the same signature as the other systems."""
    import torch

    def sdpa(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=mask,
                                                                scale=scale)
    return sdpa


def correctness(op, q, k, v, grad, mask, scale, flex, sdpa) -> dict:
    """Max abs error of each system's output and gradients against SDPA in fp32 on the same
    inputs: the bf16 SDPA error is the noise floor to read the others against."""
    import torch
    F = torch.nn.functional
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=scale)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad.float())
    ref = ref.detach()
    out: dict = {}

    def err(a, b):
        return float((a.detach().float() - b).abs().max())

    def ours(a, b, c):
        return op(a, b, c, backend="triton", scale=scale)

    for sysname, fn in (("ours", ours), ("flex", flex), ("sdpa", sdpa)):
        if fn is None:
            continue
        try:  # forward and backward apart: a peer may have only the forward
            with torch.no_grad():
                out[sysname + "_fwd"] = err(fn(*(t.detach() for t in (q, k, v))), ref)
            qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
            gs = torch.autograd.grad(fn(qs, ks, vs), (qs, ks, vs), grad)
            out[sysname + "_grad"] = max(err(g, r) for g, r in zip(gs, ref_grads))
        except Exception as e:
            out[sysname + "_error"] = short_error(e)
    return out


# -- output

def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], meta: dict, smoke: bool) -> str:
    lines = [f"# attndsl GPU benchmark: {meta['device']}", ""]
    if smoke:
        lines += ["**Smoke run (CPU, TRITON_INTERPRET=1, fp32): the timings are meaningless; "
                  "only the plumbing is checked.**", ""]
    lines += [f"torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}, "
              f"B={meta['batch']}, H={meta['heads']}, D={meta['head_dim']}, ours "
              f"{meta['block']}x{meta['block']} blocks, flex BLOCK_SIZE {meta['flex_block']}; "
              f"median of {meta['repeats']} samples after {meta['warmup']} warm-up calls. "
              "Speedup = peer time / ours. TFLOP/s counts the needed elements only "
              "(4 * nnz * D * heads per forward).", "",
              "| case | N | system | fwd ms | fwd+bwd ms | fwd TFLOP/s | ours speedup fwd "
              "| ours speedup fwd+bwd | build s | notes |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        label = f"{row['case']} {_short_params(row['params'])}"
        if "error" in row:
            lines.append(f"| {label} | - | all | - | - | - | - | - | - | {row['error']} |")
            continue
        for sysname in SYSTEMS:
            r = row["systems"][sysname]
            note = r.get("error") or r.get("note", "")
            if sysname == "flex" and "build_eager_error" in r:
                note += f"; eager create_block_mask failed: {r['build_eager_error']}"
            lines.append(
                f"| {label} | {row['N']} | {sysname} | {fmt(r.get('fwd_ms'), '.3f')} | "
                f"{fmt(r.get('fwd_bwd_ms'), '.3f')} | {fmt(r.get('tflops_fwd'), '.1f')} | "
                f"{fmt(r.get('ours_speedup_fwd'), '.2f')} | "
                f"{fmt(r.get('ours_speedup_fwd_bwd'), '.2f')} | "
                f"{fmt(r.get('build_s'), '.4f')} | {note.replace('|', '/')} |")
    checks = [r for r in rows if r.get("check")]
    if checks:
        lines += ["", "Correctness (max abs error against fp32 SDPA on the same inputs, at "
                  "each case's smallest size):", ""]
        for row in checks:
            c = row["check"]
            parts = []
            for sysname in SYSTEMS:
                if sysname + "_fwd" not in c and sysname + "_error" not in c:
                    continue
                part = sysname
                if sysname + "_fwd" in c:
                    part += f" fwd {c[sysname + '_fwd']:.2e}"
                if sysname + "_grad" in c:
                    part += f" grad {c[sysname + '_grad']:.2e}"
                if sysname + "_error" in c:
                    what = "backward" if sysname + "_fwd" in c else "check"
                    part += f"; {what} failed ({c[sysname + '_error']})"
                parts.append(part)
            lines.append(f"- {row['case']} N={row['N']}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _short_params(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items() if k != "causal")


# -- entry point

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        # the interpreter must be chosen before triton (or attndsl's kernels) is imported
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available; nothing to benchmark (use --smoke for a CPU "
              "plumbing check)")
        return 0
    import triton
    from torch.nn.attention.flex_attention import flex_attention

    import attndsl

    if args.smoke:
        cfg = Config(device="cpu", dtype=torch.float32, block=16, flex_block=16,
                     compile_flex=False, warmup=0, repeats=1, smoke=True,
                     flex_fn=flex_attention)
        cases = SMOKE_CASES
        device_name = "cpu-smoke"
    else:
        for knob in ("cache_size_limit", "recompile_limit"):  # one graph per mask and shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        cfg = Config(device="cuda", dtype=torch.bfloat16, block=64, flex_block=128,
                     compile_flex=True, warmup=args.warmup, repeats=args.repeats,
                     flex_fn=torch.compile(flex_attention, dynamic=False))
        cases = CASES
        device_name = torch.cuda.get_device_name()
    if args.cases:
        cases = {c: cases[c] for c in args.cases if c in cases}
        if not cases:
            print(f"gpu_bench: none of {', '.join(args.cases)} has a smoke case "
                  f"({', '.join(SMOKE_CASES)} do)")
            return 0
    meta = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "attndsl": attndsl.__version__,
            "python": platform.python_version(), "dtype": str(cfg.dtype).replace("torch.", ""),
            "batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim,
            "block": cfg.block, "flex_block": cfg.flex_block, "repeats": cfg.repeats,
            "warmup": cfg.warmup, "smoke": cfg.smoke,
            "timing": "wall clock, one call" if cfg.smoke else
            "CUDA events, median of samples of back-to-back calls"}
    rows = []
    for name, (file, pattern, sizes) in cases.items():
        for i, params in enumerate(sizes[:1] if args.quick else sizes):
            t0 = time.perf_counter()
            row = run_case(name, file, pattern, params, cfg, check=(i == 0))
            if cfg.device == "cuda":
                torch.cuda.empty_cache()  # the case's tensors and masks are gone now
            row["wall_s"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            print(f"[{name} {_short_params(params)}] done in {row['wall_s']} s", flush=True)
    text = markdown(rows, meta, cfg.smoke)
    print()
    print(text)
    if cfg.smoke:
        print("(smoke run: nothing written to bench/results)")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"gpu_{slug(device_name)}"
    base.with_suffix(".md").write_text(text)
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2,
                                                    default=str))
    print(f"wrote {base.with_suffix('.md')} and {base.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

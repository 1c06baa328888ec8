"""Runs fuzz cases (mutate.py) through attndsl's Python API in worker processes, each case
under a time limit and every worker under a memory limit, and classifies each case:

    ok        the case compiled (and ran) without error
    located   an AttnError whose every report names a file, line and column, quotes the
              right line of that file under its caret, prints as printable text and leaks
              nothing (no canary text from outside the import roots, no /etc/passwd)
    failure   anything else: a traceback (any other exception), a timeout, a worker that
              ran out of memory or died, an AttnError without a location, or a location
              that quotes the wrong line

`run(...)` returns the counts and the failures; `main()` is the command line of
scripts/fuzz.py (`--cases 100000` for the long run).
"""

from __future__ import annotations

import argparse
import collections
import math
import multiprocessing as mp
import os
import queue
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from functools import cache
from pathlib import Path

from .mutate import doc_files as _doc_files
from .mutate import make_case

doc_files = cache(_doc_files)
CANARY = "ATTNDSL_CANARY_7f3a"  # the text of the file outside the roots; never reported
SECRETS = (CANARY, "root:x:0:0")
WALL_FACTOR = 6  # a case blocked (not computing) is stopped after this many budgets of wall time
SMALL = 1 << 16  # masks and attention run below this many (query, key, head) entries ...
HUGE = 1 << 40  # ... or above this, where only the size checks may answer (fast)
HISTORY = 200  # cases a worker names when a backend disagrees (state left by earlier cases)


class Mismatch(Exception):
    """A backend's result that is not the reference's."""


class CaseTimeout(BaseException):
    """Raised by the CPU-time alarm in a worker; a BaseException so that no `except Exception` in
    the code under test can take it for an ordinary error."""


# ------------------------------------------------------------------ one case


def _params(cp, rng):
    """Values for the parameters without defaults: mostly small, sometimes extreme."""
    out = {}
    for p, t in cp.params:
        if p.default is not None and rng.random() < 0.8:
            continue
        if t.kind == "bool":
            v = rng.random() < 0.5
        elif t.kind == "float":
            v = rng.choice([0.5, 1.0, 2.0, 0.0, -1.0, 1e308])
        else:
            v = rng.choice([8, 8, 8, 16, 4, 2, 1, 3, 5, 0, -1, 1 << 31, 1 << 62,
                            (1 << 63) - 1])
        out[p.name] = v if t.n is None else (v,) * t.n
    return out


def _tensors(op, rng, torch):
    """q, k, v and run-time inputs for a small or a huge op (huge: expanded, free)."""
    bp = op.bound
    heads = op.heads or rng.choice([1, 2])
    kv_heads = heads if heads % 2 or rng.random() < 0.7 else heads // 2
    d = rng.choice([4, 8])
    # expanded (free) tensors whenever real ones would be large: 2^31 heads of 64 tokens too
    big = heads * bp.nq * bp.nk > SMALL or heads * max(bp.nq, bp.nk) * d > SMALL
    if heads * max(bp.nq, bp.nk, d) * max(d, bp.nq, bp.nk) >= 1 << 62:
        return None, None, None, _inputs(op, rng, torch)

    dtype = rng.choice([torch.float32, torch.float64])

    def make(h, n, dim):
        if big:
            return torch.zeros(1, 1, 1, 1, dtype=dtype).expand(1, h, n, dim)
        return torch.randn(1, h, n, dim, dtype=dtype)

    if bp.channel:
        q, k, v = make(heads, 4, bp.nq), make(kv_heads, 4, bp.nk), make(kv_heads, 4, bp.nk)
    else:
        q, k, v = make(heads, bp.nq, d), make(kv_heads, bp.nk, d), make(kv_heads, bp.nk, d)
    return q, k, v, _inputs(op, rng, torch)


def _inputs(op, rng, torch) -> dict:
    inputs = {}
    for name, (kind, dims, optional) in op.inputs.items():
        if optional and rng.random() < 0.5:
            continue
        shape = [1 if d is None else d for d in dims]
        if any(s < 0 for s in shape) or math.prod(shape) >= 1 << 62:
            continue  # no tensor has this shape (attndsl says so, or torch cannot)
        dtype = {"float": torch.float64, "bool": torch.bool}.get(kind, torch.int64)
        if math.prod(shape) > SMALL:  # the size checks answer; an expanded tensor is free
            inputs[name] = torch.zeros((1,) * len(shape), dtype=dtype).expand(shape)
        elif kind == "float":
            inputs[name] = torch.randn(shape, dtype=dtype)
        elif kind == "bool":
            inputs[name] = torch.rand(shape) < 0.5
        else:
            inputs[name] = torch.randint(0, 4, shape)
    return inputs


def exercise(case: dict) -> None:
    """Check, compile, mask and run (reference and CPU backends) what the case holds."""
    import random

    import torch

    import attndsl
    rng = random.Random(case["seed"])
    torch.manual_seed(case["seed"])
    roots = case["roots"]
    source = Path(case["main"]) if case["main"] else case["source"]
    checked = attndsl.check(source, import_roots=roots)
    for name, cp in list(checked.items())[:2]:
        op = attndsl.compile(source, pattern=name, import_roots=roots, **_params(cp, rng))
        bp = op.bound
        size = bp.nq * bp.nk * (op.heads or 1)
        if SMALL < size < HUGE:
            continue  # legal work, but more than a fuzz case should spend time on
        q, k, v, inputs = _tensors(op, rng, torch)
        mask_inputs = {n: x for n, x in inputs.items() if n != (bp.route or ("",))[0]}
        if bp.content_dependent:
            op.mask(q=q, k=k, **mask_inputs)
        else:
            op.mask(**mask_inputs)
        if q is None:
            continue  # tensors torch cannot even describe (2^62 elements or more)
        triton = rng.random() < (0.3 if q.dtype == torch.float32 else 0.03)
        backends = ["reference", "cpu"] + (["triton"] if triton else [])
        ref = None
        for backend in backends:
            out = op(q, k, v, backend=backend, **inputs)
            if ref is None:
                ref = out
                continue
            if out.shape != ref.shape:
                raise Mismatch(f"{backend} gives shape {tuple(out.shape)}, the reference "
                               f"{tuple(ref.shape)}")
            tol = 1e-3 if q.dtype == torch.float32 or backend == "triton" else 1e-6
            fine = torch.isfinite(ref)
            if not bool(torch.isclose(out.double()[fine], ref.double()[fine], rtol=tol,
                                      atol=tol).all()):
                err = (out.double()[fine] - ref.double()[fine]).abs().max().item()
                raise Mismatch(f"{backend} differs from the reference by {err:.3g}")


def _lines_of(file: str, case: dict, texts: dict) -> list[str] | None:
    """The lines of the file a span names, in attndsl's line model, or None if unknown."""
    from attndsl.lang.parser import source_lines
    if file == "<string>":
        return source_lines(case["source"])
    if file not in texts:
        try:
            data = Path(file).read_bytes()
        except OSError:
            texts[file] = None
        else:
            texts[file] = source_lines(data.decode("utf-8", errors="replace"))
    return texts[file]


def classify(err, case: dict) -> tuple[str, str]:
    """('located', '') or ('failure', why) for an AttnError."""
    import attndsl
    report = err.render()
    for secret in SECRETS[case["roots"] != ():]:  # an allowed root's canary may show
        if secret in report:
            return "failure", f"leak: the report quotes '{secret}'"
    if not all(line.isprintable() for line in report.split("\n")):
        return "failure", "unprintable characters in the report"
    errs = err.errors if isinstance(err, attndsl.AttnErrors) else [err]
    texts: dict = {}
    for e in errs:
        s = e.span
        if s is None:
            return "failure", f"unlocated: {type(e).__name__}: {e.message}"
        if s.line < 1 or s.col < 1:
            return "failure", f"bad location {s.line}:{s.col}: {e.message}"
        lines = _lines_of(s.file, case, texts)
        if lines is None:
            continue  # a file that is gone (or never was): nothing to compare with
        want = lines[s.line - 1] if s.line <= len(lines) else ""
        if s.text != want:
            return "failure", (f"wrong line under the caret at {s.file}:{s.line}: shows "
                               f"{s.text[:60]!r}, the line is {want[:60]!r}")
        if s.col > len(want) + 2:
            return "failure", f"column {s.col} beyond line {s.line} of {s.file}"
    return "located", ""


def run_case(case: dict, budget: float) -> tuple[str, str]:
    import attndsl

    def alarm(signum, frame):
        raise CaseTimeout()

    signal.signal(signal.SIGPROF, alarm)
    signal.setitimer(signal.ITIMER_PROF, budget)  # CPU seconds: the same on a busy machine
    try:
        exercise(case)
        return "ok", ""
    except attndsl.AttnError as e:
        signal.setitimer(signal.ITIMER_PROF, 0)
        return classify(e, case)
    except CaseTimeout:
        return "failure", f"timeout: more than {budget:g} s of CPU time"
    except Mismatch as e:
        return "failure", f"mismatch: {e}"
    except MemoryError:
        return "failure", "out of memory (MemoryError)"
    except RecursionError:
        return "failure", "RecursionError:\n" + traceback.format_exc(limit=-8)
    except Exception:
        return "failure", "traceback:\n" + traceback.format_exc(limit=-12)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


# ------------------------------------------------------------------ workers


def _setup_case(case: dict, home: Path, outside: Path) -> dict:
    """A fresh folder for the case, its files written (with the hostile extras: a folder
    named like a file, a link to the canary outside), and {OUTSIDE} filled in."""
    d = home / "case"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    fill = str(outside)
    for rel, text in {**doc_files(), **case["files"]}.items():
        p = d / rel.replace("{OUTSIDE}", fill)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text.replace("{OUTSIDE}", fill), errors="surrogatepass")
    (d / "dir.attn").mkdir(exist_ok=True)
    if not (d / "link.attn").exists():
        os.symlink(outside / "secret.attn", d / "link.attn")
    os.chdir(d)
    return {**case, "source": case["source"].replace("{OUTSIDE}", fill),
            "roots": tuple(r.replace("{OUTSIDE}", fill) for r in case["roots"])}


def _worker(inq, outq, budget: float, memory: int, scratch: str) -> None:
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    import torch
    torch.set_num_threads(1)  # CPU time is then the case's own time, and workers share fairly
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ATTNDSL_CACHE"] = os.path.join(scratch, "cache")
    # imported before the first case's clock starts: an alarm in the middle of an import
    # would leave a half-initialised module behind for every later case
    import torch._dynamo  # noqa: F401 - the custom ops import it on their first call

    import attndsl  # noqa: F401
    import attndsl.codegen.cpu.kernels  # noqa: F401
    try:
        import triton  # noqa: F401

        import attndsl.codegen.triton.runtime  # noqa: F401
    except ImportError:  # without triton the Triton backend says so (a located error)
        pass
    home = Path(tempfile.mkdtemp(dir=scratch))
    outside = home / "outside"
    outside.mkdir()
    (outside / "secret.attn").write_text(f"{CANARY} = 1\n")
    history: collections.deque = collections.deque(maxlen=HISTORY)
    while True:
        case = inq.get()
        if case is None:
            return
        t0 = time.perf_counter()
        try:
            ready = _setup_case(case, home, outside)
            outcome, why = run_case(ready, budget)
        except BaseException:  # noqa: BLE001 - the harness itself must report, not die
            outcome, why = "failure", "harness:\n" + traceback.format_exc(limit=-6)
        os.chdir(home)
        if outcome == "failure" and why.startswith("mismatch"):
            # a result that may depend on what this process ran before: name it, so that
            # `--sequence` can replay exactly that in one worker
            why += "\n  cases this worker ran before: " + ",".join(map(str, history))
        history.append(case["index"])
        outq.put((case["index"], outcome, why, time.perf_counter() - t0))
        if why.startswith("timeout"):
            return  # interrupted anywhere, even in an import: the next case gets a new worker


class _Slot:
    def __init__(self, ctx, outq, budget, memory, scratch):
        self.inq = ctx.Queue()
        self.proc = ctx.Process(target=_worker, args=(self.inq, outq, budget, memory, scratch),
                                daemon=True)
        self.proc.start()
        self.case = None
        self.since = 0.0


def run(cases: int, seed: int = 0, workers: int = 2, budget: float = 10.0,
        memory: int = 3 << 30, start: int = 0, progress=None, sequence=None) -> dict:
    """Run cases start .. start + cases - 1 of `seed` (or the case indices in `sequence`, in
    that order); return counts, failures and times."""
    ctx = mp.get_context("spawn")
    outq = ctx.Queue()
    scratch = tempfile.mkdtemp(prefix="attndsl-fuzz-")
    slots = [_Slot(ctx, outq, budget, memory, scratch) for _ in range(workers)]
    todo = (list(range(start, start + cases)) if sequence is None else list(sequence))[::-1]
    cases = len(todo)
    counts = {"ok": 0, "located": 0, "failure": 0}
    failures, slowest = [], []
    t0 = time.perf_counter()
    done = 0
    try:
        while done < cases:
            for s in slots:
                if s.case is None and todo:
                    s.case = make_case(seed, todo.pop())
                    s.since = time.perf_counter()
                    s.inq.put(s.case)
            try:
                index, outcome, why, secs = outq.get(timeout=0.5)
            except queue.Empty:
                index = None
            now = time.perf_counter()
            if index is not None:
                i, s = next((i, s) for i, s in enumerate(slots)
                            if s.case is not None and s.case["index"] == index)
                s.case = None
                slowest.append((secs, index))
                if why.startswith("timeout"):  # that worker has exited: replace it
                    s.proc.join(timeout=5)
                    slots[i] = _Slot(ctx, outq, budget, memory, scratch)
            else:
                for i, s in enumerate(slots):  # hung in C code, or dead: replace the worker
                    if s.case is None:
                        continue
                    dead = not s.proc.is_alive()
                    if dead or now - s.since > WALL_FACTOR * budget + 30:
                        index, outcome = s.case["index"], "failure"
                        why = (f"worker died (exit code {s.proc.exitcode})" if dead else
                               f"timeout: no answer after {now - s.since:.0f} s")
                        s.proc.kill()
                        slots[i] = _Slot(ctx, outq, budget, memory, scratch)
                        break
                if index is None:
                    continue
            done += 1
            counts[outcome] += 1
            if outcome == "failure":
                c = make_case(seed, index)
                failures.append({"index": index, "kind": c["kind"], "why": why,
                                 "source": c["source"][:2000], "files": c["files"],
                                 "main": c["main"]})
            if progress is not None and done % 500 == 0:
                progress(done, counts, time.perf_counter() - t0)
    finally:
        for s in slots:
            s.inq.put(None)
        for s in slots:
            s.proc.join(timeout=5)
            if s.proc.is_alive():
                s.proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    errors = counts["located"] + sum(1 for f in failures if f["why"].startswith(
        ("unlocated", "wrong line", "bad location", "column")))
    return {"cases": cases, "seed": seed, "counts": counts, "failures": failures,
            "seconds": time.perf_counter() - t0,
            "located_share": counts["located"] / errors if errors else 1.0,
            "timeouts": sum(f["why"].startswith("timeout") for f in failures),
            "tracebacks": sum(f["why"].startswith(("traceback", "RecursionError", "harness"))
                              for f in failures),
            "slowest": sorted(slowest, reverse=True)[:5]}


def summary(res: dict) -> str:
    c = res["counts"]
    lines = [f"{res['cases']:,} cases (seed {res['seed']}) in {res['seconds']:.0f} s: "
             f"{c['ok']:,} ok, {c['located']:,} located errors, {c['failure']:,} failures "
             f"({res['tracebacks']} tracebacks, {res['timeouts']} timeouts); "
             f"{res['located_share']:.2%} of errors located; slowest case "
             f"{res['slowest'][0][0]:.2f} s" if res["slowest"] else ""]
    for f in res["failures"][:20]:
        lines.append(f"- case {f['index']} ({f['kind']}): {f['why']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="attndsl's fuzzer: mutants of the standard "
                                 "library and the documentation's examples, and hostile "
                                 "programs, through the Python API")
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case index (to reproduce)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    ap.add_argument("--memory", type=float, default=3.0, help="GiB of address space per "
                    "worker")
    ap.add_argument("--show", action="store_true", help="print the cases' sources")
    ap.add_argument("--sequence", help="comma-separated case indices to run in this order "
                    "(with --workers 1: replays what one worker ran before a failure)")
    args = ap.parse_args(argv)
    sequence = None
    if args.sequence:
        try:
            sequence = [int(x) for x in args.sequence.split(",") if x.strip()]
        except ValueError:
            ap.error("--sequence takes comma-separated case indices")
    if args.show:
        for i in range(args.start, args.start + args.cases):
            c = make_case(args.seed, i)
            print(f"# ---- case {i}: {c['kind']}\n{c['source']}{c['files'] or ''}")
        return 0

    def progress(done, counts, secs):
        print(f"  {done:,} cases, {counts['failure']} failures, {secs:.0f} s",
              file=sys.stderr, flush=True)

    res = run(args.cases, args.seed, args.workers, args.timeout, int(args.memory * 2**30),
              args.start, progress, sequence)
    print(summary(res))
    return 1 if res["failures"] else 0


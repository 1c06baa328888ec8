"""`evaluate`: train tiny models over patterns on a recall task and score them per distance
band against what each pattern can reach.

Arms are trained seed by seed (every arm at seed 0, then every arm at seed 1, ...), so an
interrupted evaluation has a comparison as early as possible. Every arm of one seed starts
from the same weights (the same parameter shapes under the same seed) and sees the same
batches; every model is scored on one fixed test set.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from attndsl import __version__
from attndsl.api import BACKENDS, Op
from attndsl.api import compile as compile_op
from attndsl.errors import ParameterError, UnsupportedError, did_you_mean
from attndsl.evaluation import coverage
from attndsl.evaluation.model import TinyLM, attention_for, dense_flops_per_sequence
from attndsl.evaluation.result import SCHEMA, EvalResult, pack, summarize
from attndsl.evaluation.tasks import IGNORE, Task, default_test_sequences
from attndsl.evaluation.train import Hyper, Progress, train

# CPU seconds of the first arm's first run (see `evaluate`): at the default sizes dense
# attention on MQAR stays near 13% for ~1,500 steps, then learns to recall within ~300
# (docs/eval.md); 300 s is about 2,300 steps at 0.13 s per step on one thread.
DEFAULT_BUDGET = 300.0
TEST_SEED = 1_000_003  # the test set's generator seed: one test set for every arm and seed

CONTROL_SOURCE = """\
## Dense attention, the control arm of `attndsl eval`: every earlier key (causal) or every key.
pattern dense(N: int, causal: bool = true) {
    space seq(N)
    attend k <= q or not causal
}
"""


@dataclass(frozen=True)
class Arm:
    """One model configuration: a pattern per layer (layer 1 first)."""

    name: str
    ops: tuple
    control: bool = False


def _label(op: Op) -> str:
    vals = ", ".join(f"{k}={v}" for k, v in op.family.given)
    return f"{op.name}({vals})"


def _arm(spec, layers: int) -> Arm:
    if isinstance(spec, Op):
        return Arm(_label(spec), (spec,) * layers)
    if isinstance(spec, list | tuple) and spec and all(isinstance(o, Op) for o in spec):
        if len(spec) != layers:
            raise ParameterError(f"a per-layer arm needs one op per layer: {len(spec)} ops "
                                 f"for {layers} layers")
        ops = tuple(spec)
        name = _label(ops[0]) if all(o is ops[0] for o in ops) else " + ".join(
            _label(o) for o in ops)
        return Arm(name, ops)
    raise ParameterError("each arm is an attndsl Op (the same pattern in every layer) or a "
                         f"list of Ops (one per layer), not {type(spec).__name__}")


def _sizes(op: Op, n: int) -> dict:
    return {s: n for s in op.sizes}


def _bind(op: Op, n: int):
    """The op bound as a self-attention sequence pattern of n tokens whose inputs the layer
    can supply; anything else fails here, before training."""
    bp = op.bind(**_sizes(op, n))
    if len(bp.qshape) != 1 or bp.qshape != bp.kshape or bp.qshape[0] != n:
        raise UnsupportedError(f"eval's tasks are sequences of {n} tokens attending each "
                               f"other; pattern '{op.name}' has {list(bp.qshape)} queries and "
                               f"{list(bp.kshape)} keys", bp.checked.span)
    if bp.content_dependent:
        raise UnsupportedError(f"pattern '{op.name}' depends on q and k: its reach is not "
                               "known before training, so eval does not take it",
                               bp.checked.span)
    routed = bp.route[0] if bp.route is not None else None
    for name, decl in bp.inputs.items():
        if not decl.optional and name != routed:
            raise UnsupportedError(f"pattern '{op.name}' needs the run-time input '{name}', "
                                   "which eval's tasks do not provide", bp.checked.span)
    return bp


def _provenance(op: Op) -> dict:
    cp = op.family.checked
    return {"pattern": op.name,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in op.family.given},
            "file": cp.file,
            "source_sha256": hashlib.sha256((cp.text or "").encode()).hexdigest(),
            "digest": cp.key[-1] if cp.key else None}


def _git() -> dict | None:
    """The commit of the attndsl checkout in use, if it is one."""
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "attndsl", "codegen", "patterns", "grammar"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head or None, "dirty": bool(dirty)}


def machine() -> dict:
    """Where the figures were measured."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "load_average": load}


def versions() -> dict:
    import numpy
    return {"attndsl": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "git": _git()}


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ParameterError(f"{name} must be an int >= {minimum}, not {v!r}")
    return v


def _seeds(seeds) -> tuple[int, ...]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return tuple(range(_positive_int("seeds", seeds)))
    if isinstance(seeds, list | tuple) and seeds and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        if len(set(seeds)) != len(seeds):
            raise ParameterError(f"seeds must be distinct, not {list(seeds)}")
        return tuple(seeds)
    raise ParameterError(f"seeds must be a count or a list of ints >= 0, not {seeds!r}")


def evaluate(*arms, task: str = "mqar", layers: int = 2, steps: int | None = None,
             budget: float | None = None, seeds=2, control: bool = True,
             seq_len: int | None = None, vocab: int = 256, items: int = 8,
             power_a: float = 0.01, distance: int | None = None, d_model: int = 64,
             heads: int = 4, batch: int = 64, lr: float = 3e-3, warmup: int = 50,
             weight_decay: float = 0.0, test_sequences: int | None = None,
             test_seed: int = TEST_SEED, bands: int = 8, equal_flops: bool = True,
             threads: int | None = 1, backend: str = "cpu", import_roots=(),
             progress: bool | None = None) -> EvalResult:
    """Train a small transformer per arm and seed on `task` and score recall per distance
    band against each arm's analysed reach (docs/eval.md).

    Each arm is an Op (its pattern in every layer) or a list of `layers` Ops (layer 1
    first). A dense-attention control arm comes first unless `control=False`. Training
    length: `steps`, or `budget` seconds (default 300) of CPU time: the first run (the
    control at the first seed) trains until its steps have used the budget, and its step
    count K becomes every run's, so results stay deterministic and `steps=K` reproduces them
    (CPU time, so that a busy machine delays the runs without shortening them). With
    `equal_flops`, each arm also trains on to the step where its FLOPs equal the first
    arm's at K (FLOPs from the analysed attention pairs and the linear layers) and is scored
    there too.
    `threads`: torch threads while training (None: leave as is); bitwise repeatability needs
    the same thread count. Ctrl-C stops early and returns what is done, marked interrupted.
    """
    if steps is not None and budget is not None:
        raise ParameterError("give steps or budget, not both")
    if steps is not None:
        _positive_int("steps", steps)
    if budget is None and steps is None:
        budget = DEFAULT_BUDGET
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                               or not 0 < budget < math.inf):
        raise ParameterError(f"budget must be a positive number of seconds, not {budget!r}")
    for name, v in (("layers", layers), ("d_model", d_model), ("heads", heads),
                    ("batch", batch), ("bands", bands)):
        _positive_int(name, v)
    _positive_int("warmup", warmup, 0)
    if threads is not None:
        _positive_int("threads", threads)
    if d_model % heads:
        raise ParameterError(f"d_model {d_model} must be a multiple of heads {heads}")
    if not (isinstance(lr, int | float) and 0 < lr < math.inf):
        raise ParameterError(f"lr must be a positive number, not {lr!r}")
    if backend not in BACKENDS:
        raise UnsupportedError(f"unknown backend '{backend}'" + did_you_mean(backend,
                                                                             BACKENDS))
    seed_list = _seeds(seeds)
    user = [_arm(a, layers) for a in arms]
    if not user and not control:
        raise ParameterError("nothing to evaluate: give an op, or keep the control")
    fixed = {op.bound.nq for a in user for op in a.ops if not op.sizes}
    if seq_len is None:
        seq_len = fixed.pop() if len(fixed) == 1 else 128
    t = Task(task, seq_len, vocab, items, power_a, distance)
    n = t.seq_len
    if test_sequences is None:
        test_sequences = default_test_sequences(t)
    _positive_int("test_sequences", test_sequences)
    hyper = Hyper(batch=batch, lr=float(lr), warmup=warmup, weight_decay=weight_decay)
    if progress is None:
        progress = sys.stderr.isatty()

    # -- the patterns: bound, analysed and their reach, before anything is trained
    bound = {id(op): _bind(op, n) for a in user for op in a.ops}
    causal_all = True
    analyses: dict[int, object] = {}
    hd = d_model // heads
    for a in user:
        for op in a.ops:
            if id(op) not in analyses:
                analyses[id(op)] = op.analyze(layers, head_dim=hd, progress=False,
                                              **_sizes(op, n))
                causal_all &= analyses[id(op)].causal
    if control:
        dense = compile_op(CONTROL_SOURCE, causal=causal_all)
        bound[id(dense)] = _bind(dense, n)
        analyses[id(dense)] = dense.analyze(layers, head_dim=hd, progress=False, N=n)
        name = "dense (control)" if causal_all else "dense bidirectional (control)"
        user.insert(0, Arm(name, (dense,) * layers, control=True))
    names = [a.name for a in user]
    if len(set(names)) != len(names):
        raise ParameterError("two arms have the same name: "
                             + ", ".join(sorted({x for x in names if names.count(x) > 1})))

    test = t.sample(test_sequences, torch.Generator().manual_seed(test_seed))
    where = (test.labels != IGNORE).nonzero()
    pos = where[:, 1]
    lo, hi = test.lo[where[:, 0], pos], test.hi[where[:, 0], pos]
    dist = pos - hi
    band = coverage.Bands.even(n - 1, bands)
    arm_info = []
    per_seq = dense_flops_per_sequence(t.vocab, n, d_model, layers, t.answers_per_sequence)
    for a in user:
        reach = coverage.reach_matrix([bound[id(op)] for op in a.ops])
        ok = coverage.answers_in_reach(reach, pos, lo, hi)
        attn = 0.0
        for op in a.ops:
            an = analyses[id(op)]
            attn += an.flops_forward * heads / an.heads
        flops = batch * (3.0 * per_seq + 3.5 * attn)
        arm_info.append({"in_reach": ok, "flops_per_step": flops,
                         "attention_flops_per_step": batch * 3.5 * attn,
                         "causal": all(analyses[id(op)].causal for op in a.ops),
                         "analysis": [_analysis_json(analyses[id(op)]) for op in a.ops],
                         "patterns": [_provenance(op) for op in a.ops]})

    # -- training
    def builder(a: Arm):
        return lambda: TinyLM(t.vocab, n, d_model, [
            attention_for(op, d_model, heads, backend, import_roots) for op in a.ops])

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    where_run = machine()
    ran_with = versions()  # the code at the start: a run can outlast commits
    t0 = time.perf_counter()
    runs: list[list] = [[] for _ in user]
    k_steps = steps
    interrupted = False
    ref = arm_info[0]["flops_per_step"]
    try:
        for seed in seed_list:
            for i, a in enumerate(user):
                label = f"{a.name} seed {seed}"
                if k_steps is None:
                    bar = Progress(label, None, budget, progress)
                    run = train(builder(a), t, hyper, seed, test, seconds=budget,
                                progress=bar)
                    k_steps = run.steps
                else:
                    stops = {k_steps}
                    if equal_flops and len(user) > 1:
                        stops.add(max(1, math.floor(k_steps * ref
                                                    / arm_info[i]["flops_per_step"])))
                    bar = Progress(label, max(stops), None, progress)
                    run = train(builder(a), t, hyper, seed, test, stops=tuple(sorted(stops)),
                                progress=bar)
                runs[i].append(run)
                if run.interrupted:
                    interrupted = True
                    break
            if interrupted:
                break
    except KeyboardInterrupt:  # a second Ctrl-C while an interrupted run was being scored
        interrupted = True
    finally:
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - t0

    data = {
        "schema": SCHEMA,
        "task": t.to_json(),
        "model": {"layers": layers, "d_model": d_model, "heads": heads, "head_dim": hd,
                  "mlp_ratio": 4, "positions": "learned absolute", "norm": "pre-LayerNorm",
                  "backend": backend},
        "training": {**hyper.to_json(), "steps": k_steps,
                     "budget_seconds": budget if steps is None else None,
                     "equal_flops": equal_flops, "seeds": list(seed_list),
                     "threads": threads if threads is not None else old_threads,
                     "test_sequences": test_sequences, "test_seed": test_seed,
                     "test_answers": len(pos)},
        "bands": band.to_json(),
        "answers": {"distance": dist.tolist()},
        "arms": [],
        "interrupted": interrupted,
        "versions": ran_with,
        "machine": {**where_run, "threads": threads if threads is not None else old_threads},
        "started": started.isoformat(timespec="seconds"),
        "seconds": seconds,
    }
    for a, info, rs in zip(user, arm_info, runs):
        data["arms"].append({
            "name": a.name, "control": a.control, "causal": info["causal"],
            "patterns": info["patterns"], "analysis": info["analysis"],
            "flops_per_step": info["flops_per_step"],
            "attention_flops_per_step": info["attention_flops_per_step"],
            "in_reach": pack(info["in_reach"]),
            "runs": [{"seed": r.seed, "steps": r.steps, "seconds": r.seconds,
                      "cpu_seconds": r.cpu_seconds,
                      "tokens_per_second": r.steps * batch * n / r.seconds if r.seconds
                      else None,
                      "interrupted": r.interrupted,
                      "checkpoints": [{"step": c.step, "seconds": c.seconds, "loss": c.loss,
                                       "correct": pack(c.correct)}
                                      for c in r.checkpoints]} for r in rs]})
    return EvalResult(summarize(data))


def _analysis_json(a) -> dict:
    """What `attndsl analyze` says of the pattern at this length, in brief."""
    return {"pattern": a.pattern, "causal": a.causal,
            "reach_last_query": [s.reach for s in a.layers],
            "min_reach": [s.min_reach for s in a.layers],
            "full_coverage_layers": a.full_coverage_layers, "nnz": a.nnz,
            "density": a.density}

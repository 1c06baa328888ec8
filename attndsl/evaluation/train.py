"""One training run: a model, a seed, a step count (or a time budget), evaluations of the
fixed test set at chosen steps. Deterministic: the model is initialised under
`torch.manual_seed(seed)` inside `torch.random.fork_rng` (the caller's RNG is untouched)
and the batches come from a generator seeded from the seed alone, so the state after k
steps is the same whether a run stops at k or goes on."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attndsl.evaluation.tasks import IGNORE, Batch, Task

DATA_STREAM = 0x5EED  # training batches of seed s come from Generator(s * 2**20 + DATA_STREAM)
EVAL_BATCH = 256
LOSS_WINDOW = 20  # the loss reported at a step: the mean of the last 20 training losses


@dataclass(frozen=True)
class Hyper:
    """What trains the model; recorded in every result."""

    batch: int = 64
    lr: float = 3e-3
    warmup: int = 50  # linear warm-up steps, then a constant learning rate
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient norm clipping
    betas: tuple = (0.9, 0.98)

    def to_json(self) -> dict:
        return {"optimizer": "AdamW", "batch": self.batch, "lr": self.lr,
                "schedule": f"linear warm-up over {self.warmup} steps, then constant",
                "warmup": self.warmup, "weight_decay": self.weight_decay,
                "grad_clip": self.clip, "betas": list(self.betas)}


@dataclass
class Checkpoint:
    step: int
    seconds: float  # training time so far (evaluations excluded)
    loss: float
    correct: torch.Tensor  # bool [A], the test answers in order


@dataclass
class Run:
    seed: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the process's CPU time in training steps (what a budget counts)
    interrupted: bool = False

    def at(self, step: int) -> Checkpoint | None:
        for c in self.checkpoints:
            if c.step == step:
                return c
        return None


@torch.no_grad()
def predict(model, test: Batch) -> torch.Tensor:
    """bool [A]: whether the argmax of each answer's logits is its label."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, test.inputs.shape[0], EVAL_BATCH):
        x, y = test.inputs[i:i + EVAL_BATCH], test.labels[i:i + EVAL_BATCH]
        ans = y != IGNORE
        out.append(model(x, ans).argmax(dim=-1) == y[ans])
    model.train(was)
    return torch.cat(out)


class Progress:
    """One status line per run on stderr: a bar when the total is known, the step, the
    mean recent loss and the elapsed time. Rewritten in place on a terminal; otherwise a
    line at most every `every` seconds (and at the first step)."""

    def __init__(self, label: str, total: int | None, budget: float | None, enabled: bool,
                 every: float = 5.0):
        self.label, self.total, self.budget, self.enabled = label, total, budget, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every, self.last = (0.25 if self.tty else every), -1e9

    def update(self, step: int, loss: float, seconds: float, force: bool = False,
               used: float | None = None) -> None:
        """`seconds`: wall time so far; `used`: what the budget counts (default: seconds)."""
        if not self.enabled or (not force and step > 1 and seconds - self.last < self.every):
            return
        self.last = seconds
        frac = (step / self.total if self.total else
                min(1.0, (seconds if used is None else used) / self.budget) if self.budget
                else 0.0)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        total = f"/{self.total}" if self.total else ""
        line = f"{self.label} [{bar}] step {step}{total} loss {loss:.3f} {seconds:6.1f}s"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Stop:
    """Ctrl-C during training: the first one asks the loop to stop after its step (an
    interrupt raised inside a step could leave a lock of torch or attndsl held, and the
    scoring after it would wait forever); a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
            self.old = None


def train(build: Callable[[], torch.nn.Module], task: Task, hyper: Hyper, seed: int,
          test: Batch, *, stops: tuple[int, ...] = (), seconds: float | None = None,
          progress: Progress | None = None) -> Run:
    """Train from seed `seed` until the last of `stops` (or until the training steps have
    used `seconds` of the process's CPU time, so that other work on a shared machine delays
    the run without shortening it), evaluating the test set at every step in `stops` and at
    the end.

    Ctrl-C (KeyboardInterrupt) ends the run early: the model as it is is evaluated and the
    run comes back marked `interrupted`. A second Ctrl-C during that evaluation propagates.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    g = torch.Generator().manual_seed(seed * (1 << 20) + DATA_STREAM)
    opt = torch.optim.AdamW(model.parameters(), lr=hyper.lr, betas=hyper.betas,
                            weight_decay=hyper.weight_decay)
    run = Run(seed)
    last = max(stops) if stops else None
    losses: list[float] = []
    spent, cpu, step = 0.0, 0.0, 0

    def recent() -> float:
        tail = losses[-LOSS_WINDOW:]
        return sum(tail) / len(tail) if tail else float("nan")

    def checkpoint():
        run.checkpoints.append(Checkpoint(step, spent, recent(), predict(model, test)))

    stop = _Stop()
    try:
        while ((last is None or step < last) and (seconds is None or cpu < seconds)
               and not stop.requested):
            t0, c0 = time.perf_counter(), time.process_time()
            for group in opt.param_groups:
                group["lr"] = hyper.lr * min(1.0, (step + 1) / max(1, hyper.warmup))
            b = task.sample(hyper.batch, g)
            ans = b.labels != IGNORE
            loss = F.cross_entropy(model(b.inputs, ans), b.labels[ans])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hyper.clip)
            opt.step()
            step += 1
            spent += time.perf_counter() - t0
            cpu += time.process_time() - c0
            losses.append(loss.item())
            if progress is not None:
                progress.update(step, recent(), spent, used=cpu)
            if step in stops:
                checkpoint()
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        stop.restore()
    run.interrupted = run.interrupted or stop.requested
    if progress is not None:
        progress.update(step, recent(), spent, force=True, used=cpu)
        progress.close()
    run.steps, run.seconds, run.cpu_seconds = step, spent, cpu
    if step > 0 and (not run.checkpoints or run.checkpoints[-1].step != step):
        checkpoint()
    return run

"""The result of `attndsl eval`: one JSON document (schema `attndsl.eval/1`) holding the
setup, every run's per-answer results and the summary derived from them, with its text
report and plot. `EvalResult.load(path)` reads a saved one back, so committed results can
be reported and compared again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from attndsl.evaluation.coverage import Bands, reach_limits

SCHEMA = "attndsl.eval/1"
MIN_GAP = 0.05  # below dense by more than this (and 3 standard errors): "below dense"
MIN_CHANCE_GAP = 0.02  # above chance by more than this (and 3 standard errors): "above"


def pack(flags: torch.Tensor) -> str:
    """bool [A] -> hex string of its bits (test order)."""
    return np.packbits(flags.numpy().astype(np.uint8)).tobytes().hex()


def unpack(text: str, count: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:count]
    return torch.from_numpy(bits.astype(bool))


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "per_seed": [float(v) for v in arr]}


def _mean_on(vectors: list[torch.Tensor], sel: torch.Tensor) -> float | None:
    """Mean over seeds of the accuracy on the selected answers; None when none is."""
    if not bool(sel.any()):
        return None
    return float(np.mean([float(v[sel].float().mean()) for v in vectors]))


def _tolerance(p: float, n: int, floor: float) -> float:
    return max(floor, 3.0 * math.sqrt(max(p * (1 - p), 1e-12) / max(1, n)))


def _verdict(acc_in, acc_out, ctrl_in, n_in, n_out, chance, has_control) -> dict:
    out = {"within": None, "beyond": None}
    if acc_out is not None:
        out["beyond"] = ("at chance" if acc_out <= chance + _tolerance(chance, n_out,
                                                                         MIN_CHANCE_GAP)
                         else "above chance")
    if acc_in is not None:
        if not has_control or ctrl_in is None:
            out["within"] = "no control"
        elif ctrl_in <= chance + _tolerance(chance, n_in, MIN_CHANCE_GAP):
            out["within"] = "control at chance"
        else:
            gap = ctrl_in - acc_in
            out["within"] = ("below dense" if gap > _tolerance(ctrl_in, n_in, MIN_GAP)
                             else "as dense")
    return out


def _checkpoints(arm: dict, step: int, count: int) -> dict[int, tuple[dict, torch.Tensor]]:
    out = {}
    for r in arm["runs"]:
        for c in r["checkpoints"]:
            if c["step"] == step:
                out[r["seed"]] = (c, unpack(c["correct"], count))
    return out


def summarize(data: dict) -> dict:
    """Add `summary` to every arm and `ranking` to the document (from the raw results)."""
    dist = torch.tensor(data["answers"]["distance"], dtype=torch.int64)
    count = len(dist)
    bands = Bands(tuple(tuple(e) for e in data["bands"]))
    idx = bands.index(dist)
    chance = data["task"]["chance"]
    k = data["training"]["steps"]
    arms = data["arms"]
    ctrl = arms[0] if arms and arms[0]["control"] else None
    ref = arms[0]["flops_per_step"] if arms else 1.0
    views = {"equal_steps": lambda arm: k}
    if data["training"]["equal_flops"] and len(arms) > 1:
        views["equal_flops"] = lambda arm: max(1, math.floor(k * ref / arm["flops_per_step"]))
    ranking = {}
    for arm in arms:
        ok = unpack(arm["in_reach"], count)
        full, some = reach_limits(dist, ok)
        arm["reach"] = {"answers_in_reach": float(ok.float().mean()) if count else 0.0,
                        "full_distance": full, "some_distance": some,
                        "bands": [float(ok[idx == b].float().mean()) if bool((idx == b).any())
                                  else None for b in range(len(bands.edges))]}
        arm["summary"] = {}
        for view, step_of in views.items():
            if k is None:
                continue
            step = step_of(arm)
            got = _checkpoints(arm, step, count)
            ctrl_got = _checkpoints(ctrl, k, count) if ctrl is not None else {}
            seeds = sorted(got)
            s = {"step": step, "seeds": seeds}
            if seeds:
                vecs = [got[x][1] for x in seeds]
                cvecs = [ctrl_got[x][1] for x in seeds if x in ctrl_got]
                s["accuracy"] = _stats([float(v.float().mean()) for v in vecs])
                s["in_reach_accuracy"] = _mean_on(vecs, ok)
                s["beyond_reach_accuracy"] = _mean_on(vecs, ~ok)
                s["answers_in_reach"] = int(ok.sum())
                s["loss"] = float(np.mean([got[x][0]["loss"] for x in seeds]))
                s["train_seconds"] = float(np.mean([got[x][0]["seconds"] for x in seeds]))
                s["control_in_reach_accuracy"] = (_mean_on(cvecs, ok) if cvecs and not
                                                  arm["control"] else None)
                s["overall"] = _verdict(s["in_reach_accuracy"], s["beyond_reach_accuracy"],
                                        s["control_in_reach_accuracy"],
                                        int(ok.sum()), int((~ok).sum()), chance,
                                        ctrl is not None and not arm["control"])
                rows = []
                for b, (lo, hi) in enumerate(bands.edges):
                    sel = idx == b
                    n = int(sel.sum())
                    inb, outb = sel & ok, sel & ~ok
                    row = {"lo": lo, "hi": hi, "answers": n,
                           "in_reach": float(inb.sum()) / n if n else None,
                           "accuracy": _mean_on(vecs, sel),
                           "accuracy_in_reach": _mean_on(vecs, inb),
                           "accuracy_beyond_reach": _mean_on(vecs, outb),
                           "control_in_reach": _mean_on(cvecs, inb) if cvecs else None}
                    row["status"] = (None if not n else "within" if row["in_reach"] == 1.0
                                     else "beyond" if row["in_reach"] == 0.0 else "partial")
                    row["verdict"] = _verdict(row["accuracy_in_reach"],
                                              row["accuracy_beyond_reach"],
                                              row["control_in_reach"], int(inb.sum()),
                                              int(outb.sum()), chance,
                                              ctrl is not None and not arm["control"])
                    rows.append(row)
                s["bands"] = rows
            arm["summary"][view] = s
        arm["partial"] = [{"seed": r["seed"], "step": c["step"],
                           "accuracy": float(unpack(c["correct"], count).float().mean())}
                          for r in arm["runs"] if r["interrupted"] for c in r["checkpoints"][-1:]]
    for view in views:
        have = [a for a in arms if "accuracy" in a["summary"].get(view, {})]
        have.sort(key=lambda a: -a["summary"][view]["accuracy"]["mean"])
        ranking[view] = [a["name"] for a in have]
    data["ranking"] = ranking
    return data


class EvalResult:
    """An evaluation's JSON document with its report; `data` is the document."""

    def __init__(self, data: dict):
        self.data = data

    @staticmethod
    def load(path) -> EvalResult:
        with open(path) as f:
            data = json.load(f)
        if data.get("schema") != SCHEMA:
            from attndsl.errors import ParameterError
            raise ParameterError(f"'{path}' is not an attndsl eval result (schema "
                                 f"{data.get('schema')!r}, expected '{SCHEMA}')")
        return EvalResult(data)

    def to_json(self) -> dict:
        return self.data

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.data, indent=1) + "\n")

    @property
    def interrupted(self) -> bool:
        return self.data["interrupted"]

    @property
    def arms(self) -> list[str]:
        return [a["name"] for a in self.data["arms"]]

    def arm(self, name: str) -> dict:
        for a in self.data["arms"]:
            if a["name"] == name:
                return a
        from attndsl.errors import ParameterError
        raise ParameterError(f"no arm '{name}'; arms: {', '.join(self.arms)}")

    def accuracy(self, name: str, view: str = "equal_steps") -> float | None:
        """Mean test accuracy over seeds (None when no run got there)."""
        s = self.arm(name)["summary"].get(view, {})
        return s["accuracy"]["mean"] if "accuracy" in s else None

    def band_accuracy(self, name: str, view: str = "equal_steps") -> list:
        s = self.arm(name)["summary"].get(view, {})
        return [r["accuracy"] for r in s.get("bands", [])]

    def __repr__(self) -> str:
        return f"<attndsl.EvalResult {self.data['task']['name']}: {', '.join(self.arms)}>"

    def text(self) -> str:
        from attndsl.evaluation.report import text
        return text(self.data)

    def plot(self, path) -> None:
        from attndsl.evaluation.report import plot
        plot(self.data, path)

"""What a stack of attention layers can reach, per answer: the exact attention graph of
each layer's pattern (analysis/reach.py's `build_graph`, the graph `attndsl analyze` steps)
followed from the answer position down the layers, and distance bands over the answers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attndsl.analysis.reach import build_graph
from attndsl.errors import ParameterError


def reach_matrix(bound_per_layer: list) -> torch.Tensor:
    """bool [N, N]: token j is reachable from position t through the stack (layer 1 first
    in the list). The top layer's output at t mixes what t attends there; each of those
    positions mixes, one layer down, what it attends; a token's own residual counts (hop 0),
    as in `attndsl analyze`. With the same pattern in every layer this is its L-layer reach."""
    n = bound_per_layer[0].nq
    reached = torch.eye(n, dtype=torch.bool)
    graphs = {}
    for bp in reversed(bound_per_layer):
        if bp not in graphs:
            graphs[bp] = build_graph(bp, {})[0]
        reached = reached | graphs[bp].step(reached)
    return reached


def answers_in_reach(reach: torch.Tensor, where: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor) -> torch.Tensor:
    """bool [A]: whether the answer at position where[a] reaches every position of
    lo[a]..hi[a]."""
    counts = torch.cumsum(reach.to(torch.int32), dim=1)  # [N, N]
    row = counts[where]
    upto_hi = row.gather(1, hi.view(-1, 1))[:, 0]
    before_lo = torch.where(lo > 0, row.gather(1, (lo - 1).clamp_min(0).view(-1, 1))[:, 0], 0)
    return (upto_hi - before_lo) == (hi - lo + 1)


@dataclass(frozen=True)
class Bands:
    """Distance bands [lo, hi], inclusive, covering 1..max_distance."""

    edges: tuple[tuple[int, int], ...]

    @staticmethod
    def even(max_distance: int, count: int) -> Bands:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ParameterError(f"bands must be a positive int, not {count!r}")
        width = max(1, math.ceil(max_distance / count))
        edges = tuple((lo, min(lo + width - 1, max_distance))
                      for lo in range(1, max_distance + 1, width))
        return Bands(edges)

    def index(self, distance: torch.Tensor) -> torch.Tensor:
        """The band of each distance: int64 [A] (-1 outside every band)."""
        out = torch.full_like(distance, -1)
        for i, (lo, hi) in enumerate(self.edges):
            out[(distance >= lo) & (distance <= hi)] = i
        return out

    def labels(self) -> list[str]:
        return [f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in self.edges]

    def to_json(self) -> list:
        return [list(e) for e in self.edges]


def reach_limits(distance: torch.Tensor, in_reach: torch.Tensor) -> tuple[int, int]:
    """(the largest answer distance up to which every answer is in reach, the largest
    distance of any answer in reach); 0 when there is none."""
    out_d = distance[~in_reach]
    near = in_reach if not len(out_d) else in_reach & (distance < out_d.min())
    full = int(distance[near].max()) if bool(near.any()) else 0
    some = int(distance[in_reach].max()) if bool(in_reach.any()) else 0
    return full, some

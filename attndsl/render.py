"""Pictures of masks: compact text for terminals and PNG via matplotlib."""

from __future__ import annotations

import math

import torch

from attndsl.errors import ParameterError

_SHADES = " ░▒▓█"


def _query_index(op, query) -> int:
    shape = op.query_shape
    if query is None:  # the last token of a sequence, the centre of a grid
        if len(shape) == 1:
            return shape[0] - 1
        query = tuple(s // 2 for s in shape)
    if isinstance(query, int):
        idx = query
    else:
        if len(query) != len(shape) or any(not 0 <= c < s for c, s in zip(query, shape)):
            raise ParameterError(f"query {query} is not a coordinate of the {shape} space")
        idx = 0
        for c, s in zip(query, shape):
            idx = idx * s + c
    if not 0 <= idx < math.prod(shape):
        raise ParameterError(f"query {idx} is out of range (0..{math.prod(shape) - 1})")
    return idx


def _runs(xs: list[int], most: int = 12) -> str:
    """Sorted indices as runs: '0, 3..5, 9' (the first `most` runs, then '...')."""
    runs: list[list[int]] = []
    for x in xs:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    text = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in runs[:most])
    return (text + (", ..." if len(runs) > most else "")) or "none"


def _flat(m: torch.Tensor) -> torch.Tensor:
    """Per-head/batch masks are shown as their union, labelled as such."""
    while m.dim() > 2:
        m = m.any(dim=0)
    return m


def text(op, m: torch.Tensor, query=None, width: int = 64) -> str:
    m2 = _flat(m)
    nq, nk = m2.shape
    lines = [f"{op.name}: {nq} queries x {nk} keys, {int(m2.sum()):,} pairs "
             f"({float(m2.float().mean()):.2%} dense)" + (" [union over heads]"
                                                          if m.dim() > 2 else "")]
    cols = min(width, nk)
    rows = min(width // 2 if nq > width // 2 else nq, nq)
    rows = max(1, rows)
    f = torch.nn.functional.adaptive_avg_pool2d(m2.float()[None, None], (rows, cols))[0, 0]
    if rows < nq or cols < nk:
        lines.append(f"(each cell averages about {nq / rows:.1f} x {nk / cols:.1f} entries)")
    for r in range(rows):
        lines.append("|" + "".join(
            _SHADES[0] if v == 0 else _SHADES[min(4, 1 + int(v * 3.999))] for v in f[r].tolist())
            + "|")
    shape = op.key_shape
    if len(shape) == 1 and query is not None:  # a sequence: the keys of that query, as runs
        qi = _query_index(op, query)
        keys = m2[qi].nonzero().view(-1).tolist()
        lines.append(f"keys of query {qi}: {_runs(keys)} ({len(keys):,} of {nk:,})")
    if len(shape) >= 2:
        qi = _query_index(op, query)
        keys = m2[qi]
        qshape = op.query_shape
        qpos = []
        rem = qi
        for s in reversed(qshape):
            qpos.append(rem % s)
            rem //= s
        qpos = tuple(reversed(qpos))
        lines.append(f"keys of query {qpos} (index {qi}) on the {' x '.join(map(str, shape))} "
                     "key grid: # attended, Q the query, . not attended")
        grid = keys.view(*shape)
        planes = grid if len(shape) == 3 else grid[None]
        for t, plane in enumerate(planes):
            if len(shape) == 3:
                lines.append(f"t = {t}")
            for y in range(plane.shape[0]):
                row = []
                for x in range(plane.shape[1]):
                    here = (t, y, x) if len(shape) == 3 else (y, x)
                    is_q = qshape == shape and here == qpos
                    row.append("Q" if is_q else "#" if plane[y, x] else ".")
                lines.append(" ".join(row))
    return "\n".join(lines)


def plot(op, m: torch.Tensor, path: str, query=None, reach: torch.Tensor | None = None
         ) -> None:
    """The mask (black) as a PNG; with `reach` (op.reach()) also the keys a query sees only
    through summary tokens (light blue); for grids, the keys of one query on the key grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    m2 = _flat(m)
    shape = op.key_shape
    extra = len(shape) >= 2
    ncols = 2 if extra else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 5), squeeze=False)
    ax = axes[0][0]
    title = f"{op.name}: {int(m2.sum()):,} pairs ({float(m2.float().mean()):.2%})"
    if reach is not None:
        r2 = _flat(reach) | m2
        img = m2.to(torch.uint8) * 2 + (r2 & ~m2).to(torch.uint8)
        ax.imshow(img.cpu().numpy(), cmap=ListedColormap(["white", "#9ecae1", "black"]),
                  vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        title += "\nblack: direct keys; blue: through summary tokens"
    else:
        ax.imshow(m2.cpu().numpy(), cmap="Greys", interpolation="nearest", aspect="auto")
    if not extra and query is not None:
        ax.axhline(_query_index(op, query), color="r", linewidth=0.8)
    ax.set_title(title)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if extra:
        qi = _query_index(op, query)
        keys = m2[qi].view(*shape).float()
        if len(shape) == 3:  # the volume's time slices side by side
            keys = torch.cat([torch.cat([keys[t], torch.full((shape[1], 1), 0.5)], dim=1)
                              for t in range(shape[0])], dim=1)
        ax2 = axes[0][1]
        ax2.imshow(keys.cpu().numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        if op.query_shape == shape and len(shape) == 2:
            ax2.plot([qi % shape[1]], [qi // shape[1]], "r*", markersize=10)
        ax2.set_title(f"keys of query {qi}" + (" (time slices left to right)"
                                               if len(shape) == 3 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reach(op, a, path: str) -> None:
    """Reached tokens per layer: rows of a raster for sequences, grids per layer otherwise."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = [s.to(torch.float32) for s in a.reach_sets]
    shape = op.key_shape
    L = len(sets)
    if len(shape) == 1:
        n = shape[0]
        cols = min(n, 1024)
        img = torch.stack([torch.nn.functional.adaptive_max_pool1d(s.view(1, 1, -1), cols)[0, 0]
                           for s in sets])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        ax1.imshow(img.numpy(), aspect="auto", cmap="Blues", interpolation="nearest",
                   extent=(0, n, L + 0.5, 0.5))
        ax1.set_xlabel("token")
        ax1.set_ylabel("layer")
        ax1.set_title(f"tokens reached by query {a.query}")
        ax2.plot(range(1, L + 1), [s.reach_fraction * 100 for s in a.layers], "o-")
        ax2.set_xlabel("layer")
        ax2.set_ylabel("% of the full-attention field")
        ax2.set_ylim(0, 105)
        ax2.grid(alpha=0.3)
        ax2.set_title(op.name)
    else:
        fig, axes = plt.subplots(1, L, figsize=(2.6 * L, 2.8), squeeze=False)
        for i, s in enumerate(sets):
            g = s.view(*shape)
            if len(shape) == 3:  # time slices side by side
                g = torch.cat([torch.cat([g[t], torch.full((shape[1], 1), 0.3)], dim=1)
                               for t in range(shape[0])], dim=1)
            ax = axes[0][i]
            ax.imshow(g.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {i + 1}: {a.layers[i].reach_fraction:.0%}")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{op.name}: tokens reached by query {a.query}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compare(results, path: str) -> None:
    """Receptive-field growth of several patterns on one chart (PowerAttention Fig. 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for _op, a in results:
        ax.plot(range(1, len(a.layers) + 1), [s.reach_fraction * 100 for s in a.layers], "o-",
                label=a.pattern)
    ax.set_xlabel("layer")
    ax.set_ylabel("% of the full-attention receptive field")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Text reports of the CLI: the analysis table and the compiled kernels' statistics."""

from __future__ import annotations

from attndsl.analysis.reach import coords_text


def _fmt_flops(x: float) -> str:
    return f"{x:.3g}"


def layers_text(n: int) -> str:
    return f"{n} layer{'s' if n != 1 else ''}"


def coverage_text(a) -> str:
    """The layers to full coverage in a table cell: 'N layers', 'never' (the reach stopped
    growing short of it), 'never*' (likewise, though the followed query reaches its whole
    field: other queries do not; see COVERAGE_NOTE) or '> N' (still growing when the search
    stopped)."""
    if a.full_coverage_layers is not None:
        return layers_text(a.full_coverage_layers)
    if a.diameter is None:  # the reach was still growing
        return f"> {a.coverage_checked_layers}"
    return "never" if a.never_reached_count or a.layers[-1].reach_fraction < 1 else "never*"


COVERAGE_NOTE = ("never*: the followed query reaches every token full attention would give "
                 "it, but some other queries never do (prefix_lm: the prefix tokens never "
                 "see past the prefix)")


def analysis_table(a) -> str:
    """The human-readable report of `attndsl analyze`."""
    params = ", ".join(f"{k}={v}" for k, v in a.params.items())
    lines = [f"{a.pattern}({params}): {' x '.join(map(str, a.query_shape))} queries, "
             f"{' x '.join(map(str, a.key_shape))} keys, "
             f"{'causal' if a.causal else 'not causal'}"]
    lines.append(f"receptive field of query {coords_text(a.query_shape, a.query)} over "
                 f"{len(a.layers)} "
                 f"layer{'s' if len(a.layers) != 1 else ''} (statistics over {a.queries} "
                 "queries):")
    one_axis = len(a.key_shape) == 1
    lines.append(f"  {'layer':>5} {'reach':>12} {'% of full':>9} {'contiguous':>10} "
                 f"{'min reach':>10} {'mean reach':>11} {'max reach':>10} {'covered q':>10}")
    for s in a.layers:
        contiguous = ("yes" if s.continuous else "no") if one_axis else "-"
        lines.append(f"  {s.layer:>5} {s.reach:>12,} {s.reach_fraction:>9.2%} "
                     f"{contiguous:>10} {s.min_reach:>10,} "
                     f"{s.mean_reach:>11,.1f} {s.max_reach:>10,} {s.covered_queries:>10,}")
    lines.append(f"  reach: tokens reached from query {a.query}; % of full: of the tokens full "
                 f"attention would give it ({'every earlier token' if a.causal else 'every key'})"
                 + ("; contiguous: they form one interval" if one_axis else ""))
    lines.append("  min / mean / max reach: over the queries above; covered q: how many of them "
                 "reach every token full attention would")
    n = a.full_coverage_layers
    if n is not None:
        lines.append(f"full coverage: every query reaches every token full attention would "
                     f"after {layers_text(n)}")
    elif a.diameter is None:
        lines.append(f"full coverage: not within {a.coverage_checked_layers} layers (the reach "
                     "was still growing)")
    elif a.never_reached_count:
        shown = ", ".join(map(str, a.never_reached[:16]))
        lines.append(f"full coverage: never; {a.never_reached_count:,} tokens stay unreachable "
                     f"from query {a.query} (first: {shown})")
    else:
        lines.append(f"full coverage: never; query {a.query} reaches every token full "
                     f"attention would, but other queries stop short of theirs: the reach "
                     f"stops growing after {layers_text(a.diameter)}")
    if a.diameter is not None:
        lines.append(f"diameter (longest shortest path): {a.diameter} "
                     f"hop{'s' if a.diameter != 1 else ''}")
    lines.append(f"attended pairs: {a.nnz:,} ({a.density:.4%} dense)")
    lines.append(f"FLOPs: forward {_fmt_flops(a.flops_forward)}, backward "
                 f"{_fmt_flops(a.flops_backward)} (4*nnz*D per head, D={a.head_dim}, "
                 f"{a.heads} head{'s' if a.heads != 1 else ''}; backward 2.5x)")
    lines.append(f"block tables (the compiled kernels', as compile --stats): "
                 f"{a.block_table_bytes:,} bytes")
    if a.formula_nnz is not None:
        ok = {True: "matches the exact count", False: "DISAGREES with the exact count"}[
            bool(a.formula_verified)]
        lines.append(f"closed form: nnz = {a.formula_nnz} ({ok})")
        lines.append(f"             density = {a.formula_density}")
    lines.append(f"growth: {a.asymptotic}")
    lines.append(f"method: {a.method}")
    for n in a.notes:
        lines.append(f"note: {n}")
    lines.append(f"({a.seconds:.2f} s)")
    return "\n".join(lines)


def format_stats(op, s: dict) -> str:
    """The --stats report: one line per figure."""
    vals = ", ".join(f"{k}={v}" for k, v in op.params.items())
    rows = [
        f"{op.name}({vals}): queries {s['order_q']}, keys {s['order_k']}",
        f"  blocks          {s['block_q']} x {s['block_k']} tokens"
        + (f", {s['head_tables']} head tables" if s["head_tables"] > 1 else ""),
        f"  full            {s['full_blocks']:,}",
        f"  partial         {s['partial_blocks']:,}",
        f"  empty           {s['empty_blocks']:,}",
        f"  computed        {s['computed_elements']:,} score elements",
        f"  needed          {s['needed_elements']:,} (the mask's nnz)",
        f"  waste           {s['waste']:.2f}x computed / needed",
        f"  block tables    {s['block_table_bytes']:,} bytes",
        f"  build           {s['build_seconds']:.3f} s",
    ]
    return "\n".join(rows)

"""The text report and the plot of an eval result (a `attndsl.eval/1` document)."""

from __future__ import annotations

VIEWS = {"equal_steps": "equal steps", "equal_flops": "equal FLOPs"}
MARKS = {("beyond", "at chance"): "x", ("beyond", "above chance"): "!",
         ("within", "below dense"): "*"}


def _pct(x, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _mark(row: dict) -> str:
    if row["status"] == "partial":
        return "~"
    v = row["verdict"]
    if row["status"] == "beyond":
        return MARKS.get(("beyond", v["beyond"]), "")
    return MARKS.get(("within", v["within"]), "")


def _header(d: dict) -> list[str]:
    t, m, tr = d["task"], d["model"], d["training"]
    from attndsl.evaluation.tasks import Task
    task = Task(t["name"], t["seq_len"], t["vocab"], t["items"], t["power_a"], t["distance"])
    how = (f"{tr['steps']:,} steps" if tr["steps"] is not None else "no step finished")
    if tr["budget_seconds"] is not None:
        how += f" (the first run's budget of {tr['budget_seconds']:g} CPU s)"
    seeds = ", ".join(map(str, tr["seeds"]))
    mach = d["machine"]
    return [
        f"attndsl eval: {task.describe()}",
        f"model: {m['layers']} layer{'s' if m['layers'] != 1 else ''}, d_model "
        f"{m['d_model']}, {m['heads']} heads "
        f"(attndsl.nn.Attention, backend {m['backend']}); AdamW lr {tr['lr']:g}, batch "
        f"{tr['batch']}, warm-up {tr['warmup']} steps",
        f"training: {how}; seeds {seeds}; {tr['threads']} thread"
        f"{'s' if tr['threads'] != 1 else ''}; {mach['cpu'] or 'unknown CPU'}, "
        f"{mach['cpus']} CPUs, load {_load(mach['load_average'])}",
        f"test: {tr['test_sequences']:,} sequences, {tr['test_answers']:,} answers; chance "
        f"{_pct(t['chance'])}",
    ]


def _load(load) -> str:
    return "unknown" if not load else f"{load[0]:.1f}"


def _reach_text(arm: dict, n: int) -> str:
    r = arm["reach"]
    if r["answers_in_reach"] == 1.0:
        return "all"
    if r["answers_in_reach"] == 0.0:
        return "none"
    return f"<={r['full_distance']}" if r["full_distance"] else f"some {r['some_distance']}"


def _view_table(d: dict, view: str) -> list[str]:
    arms = [a for a in d["arms"] if "accuracy" in a["summary"].get(view, {})]
    if not arms:
        return []
    n, batch = d["task"]["seq_len"], d["training"]["batch"]
    order = {name: i for i, name in enumerate(d["ranking"][view])}
    arms.sort(key=lambda a: order[a["name"]])
    width = max(28, max(len(a["name"]) for a in arms) + 2)
    if view == "equal_steps":
        title = f"{VIEWS[view]} ({d['training']['steps']:,} steps):"
    else:
        title = (f"{VIEWS[view]} (each arm's steps for the FLOPs of "
                 f"{d['arms'][0]['name']} at {d['training']['steps']:,} steps):")
    out = [title, f"  {'rank':<5}{'arm':<{width}}{'steps':>7}{'accuracy':>17}{'in reach':>10}"
           f"{'beyond':>9}{'reach':>7}{'train s':>9}{'tokens/s':>10}"]
    for i, a in enumerate(arms, 1):
        s = a["summary"][view]
        acc = s["accuracy"]
        spread = f"{_pct(acc['mean'])} ± {100 * acc['std']:.1f}"
        tps = s["step"] * batch * n / s["train_seconds"] if s["train_seconds"] else 0
        out.append(f"  {i:<5}{a['name']:<{width}}{s['step']:>7,}{spread:>17}"
                   f"{_pct(s['in_reach_accuracy']):>10}{_pct(s['beyond_reach_accuracy']):>9}"
                   f"{_reach_text(a, n):>7}{s['train_seconds']:>9.1f}{tps:>10,.0f}")
    return out


def _band_table(d: dict, view: str) -> list[str]:
    arms = [a for a in d["arms"] if "bands" in a["summary"].get(view, {})]
    if not arms:
        return []
    labels = [f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in d["bands"]]
    width = max(28, max(len(a["name"]) for a in arms) + 2)
    col = max(9, max(len(x) for x in labels) + 2)
    out = [f"accuracy per query-to-value distance band, {VIEWS[view]} (x: beyond the "
           f"{d['model']['layers']}-layer reach, at chance; !: beyond reach, above chance; "
           "*: within reach, below dense; ~: partly within reach):",
           f"  {'distance':<{width}}" + "".join(f"{x:>{col}}" for x in labels)]
    counts = arms[0]["summary"][view]["bands"]
    out.append(f"  {'answers':<{width}}" + "".join(f"{r['answers']:>{col},}" for r in counts))
    for a in arms:
        cells = []
        for r in a["summary"][view]["bands"]:
            cell = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}{_mark(r)}"
            cells.append(f"{cell:>{col}}")
        out.append(f"  {a['name']:<{width}}" + "".join(cells))
    out.append("  in reach (share of answers)")
    for a in arms:
        cells = "".join(f"{'-' if x is None else f'{100 * x:.0f}%':>{col}}"
                        for x in a["reach"]["bands"])
        out.append(f"    {a['name']:<{width - 2}}" + cells)
    return out


def _verdicts(d: dict, view: str) -> list[str]:
    out = []
    chance = d["task"]["chance"]
    for a in d["arms"]:
        s = a["summary"].get(view, {})
        if a["control"] or "accuracy" not in s:
            continue
        v, parts = s["overall"], []
        n_in = s["answers_in_reach"]
        n_out = d["training"]["test_answers"] - n_in
        if v["beyond"] is not None:
            what = ("at chance: cannot recall beyond the reach" if v["beyond"] == "at chance"
                    else "ABOVE chance: more than the reach explains")
            parts.append(f"beyond reach ({n_out:,} answers) {_pct(s['beyond_reach_accuracy'])}"
                         f" (chance {_pct(chance)}), {what}")
        if v["within"] is not None:
            base = ""
            if s.get("control_in_reach_accuracy") is not None:
                base = f" vs dense {_pct(s['control_in_reach_accuracy'])} on the same answers"
            what = {"as dense": "as dense", "below dense": "below dense: did not converge in "
                    "the budget (the reach allows it)", "no control": "no control to compare",
                    "control at chance": "the dense control is at chance too: nothing learned "
                    "yet"}
            parts.append(f"within reach ({n_in:,}) {_pct(s['in_reach_accuracy'])}{base}: "
                         f"{what[v['within']]}")
        out.append(f"  {a['name']}: " + "; ".join(parts))
    return ["verdicts, " + VIEWS[view] + ":", *out] if out else []


def text(d: dict) -> str:
    lines = _header(d)
    if d["interrupted"]:
        lines.append("INTERRUPTED: partial results (runs not started are missing)")
    for view in ("equal_steps", "equal_flops"):
        for block in (_view_table(d, view), _band_table(d, view), _verdicts(d, view)):
            if block:
                lines += ["", *block]
    partial = [(a["name"], p) for a in d["arms"] for p in a["partial"]]
    if partial:
        lines += ["", "interrupted runs (scored where they stopped):"]
        lines += [f"  {name} seed {p['seed']}: step {p['step']:,}, {_pct(p['accuracy'])}"
                  for name, p in partial]
    lines.append("")
    lines.append(f"({d['seconds']:.1f} s; attndsl {d['versions']['attndsl']}, torch "
                 f"{d['versions']['torch']})")
    return "\n".join(lines)


def plot(d: dict, path) -> None:
    """Accuracy against distance, one line per arm and one panel per view, with each arm's
    reach drawn as a dashed line where its answers stop being all within reach."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    views = [v for v in ("equal_steps", "equal_flops")
             if any("bands" in a["summary"].get(v, {}) for a in d["arms"])]
    if not views:
        views = ["equal_steps"]
    fig, axes = plt.subplots(1, len(views), figsize=(6.5 * len(views), 4.5), squeeze=False)
    mids = [(lo + hi) / 2 for lo, hi in d["bands"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, view in zip(axes[0], views):
        for i, a in enumerate(d["arms"]):
            c = colors[i % len(colors)]
            s = a["summary"].get(view, {})
            if "bands" in s:
                ys = [float("nan") if r["accuracy"] is None else r["accuracy"]
                      for r in s["bands"]]
                mean = _pct(s["accuracy"]["mean"])
                ax.plot(mids, ys, "o-", color=c, label=f"{a['name']} ({mean})")
            r = a["reach"]
            if r["answers_in_reach"] < 1.0:
                ax.axvline(r["full_distance"] + 0.5, color=c, linestyle="--", linewidth=1)
        ax.axhline(d["task"]["chance"], color="gray", linestyle=":", linewidth=1,
                   label="chance")
        ax.set_xlabel("query-to-value distance (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(0, d["task"]["seq_len"])
        ax.set_title(f"{d['task']['name']}, {VIEWS[view]}; dashed: edge of the "
                     f"{d['model']['layers']}-layer reach", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

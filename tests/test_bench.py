"""`attndsl bench`: the CPU benchmark runs end to end and prints its table.

Peers that fail (or a backend="cpu" that is not there yet) are rows with their error, so the
run must succeed whatever this machine can compile.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from attndsl.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def _bench_module():
    spec = importlib.util.spec_from_file_location("cpu_bench_under_test",
                                                  ROOT / "bench" / "cpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}


def test_bench_quick_sliding_window(capsys):
    rc = main(["bench", "--quick", "--cases", "sliding_window", "--repeats", "1",
               "--no-write"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| case | size | system | fwd ms | GFLOP/s | % peak |" in out
    for system in ("ours", "flex", "sdpa"):
        assert f"| sliding_window | N=2048 window=256 | {system} |" in out
    assert "| sliding_window | N=2048 window=256 | natten |" not in out  # not a peer here
    assert "Targets:" in out and "block tables for N=1,048,576" in out
    for target in ("forward faster than FlexAttention-CPU on every case",
                   "of the fp32 matmul peak, forward + backward", "bf16 vs fp32",
                   "BigBird-style analysis (12 layers)"):
        assert target in out
    assert "N=131,072: " in out  # the analysis ran (or says why not) in its own process
    # the share of the peak is judged against a matmul timed in the case's own rounds
    assert "| % comp | % comp* | ours speedup |" in out
    assert "over the elements computed, every mask-only case (the matmul timed in" in out
    # bf16's speedup is paired by round (each round's pair saw the same load)
    assert "the median of the rounds' own fp32 / bf16 ratios" in out
    assert re.search(r"- fwd\+bwd: fp32 [0-9.]+ ms .*: bf16 [0-9.]+x "
                     r"\(rounds [0-9.]+\.\.[0-9.]+x; ratio of the medians [0-9.]+x\)", out)
    assert "wrote " not in out


def test_bench_flags_match_the_script():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    cli = _options(sub.choices["bench"])
    import argparse
    ap = argparse.ArgumentParser()
    _bench_module().add_arguments(ap)
    assert cli == _options(ap)


def test_bench_unknown_case(capsys):
    assert main(["bench", "--cases", "nope", "--no-write"]) == 1
    assert "unknown case 'nope'" in capsys.readouterr().err


def test_bench_without_a_checkout(monkeypatch, tmp_path, capsys):
    import attndsl
    monkeypatch.setattr(attndsl, "__file__", str(tmp_path / "attndsl" / "__init__.py"))
    assert main(["bench", "--quick", "--no-write"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cpu_bench.py not found" in err


def test_short_calls_get_more_samples_a_round():
    """interleaved: a name with a span makes as many calls a round as fill it (capped), the
    others one; calls_for rounds up and keeps at least one call."""
    mod = _bench_module()
    seen = []
    r = mod.interleaved({"short": lambda: seen.append("s"), "long": lambda: seen.append("l")},
                        3, {"short": 1.0})
    assert len(r["long"]["samples_s"]) == 3
    assert len(r["short"]["samples_s"]) == 3 * mod.CALLS_CAP
    # warm-up and span-measuring calls, then the rounds in turn
    assert seen == ["s", "s", "l"] + (["s"] * mod.CALLS_CAP + ["l"]) * 3
    assert mod.calls_for(0.25, 0.1) == 3 and mod.calls_for(0.25, 2.0) == 1
    assert mod.calls_for(0.25, 0.0) == mod.CALLS_CAP

"""`attndsl eval` (issue 16): tasks, reach per answer, a seconds-sized eval that separates dense
attention from a short sliding window beyond its reach, determinism, Ctrl-C, JSON, errors.

Reach and task structure are checked against definitions written here; accuracy thresholds
leave wide margins (fixed seeds, one thread) so that a faster or slightly different CPU
backend does not make them flaky."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.cli import main
from attndsl.errors import ParameterError, UnsupportedError
from attndsl.evaluation import EvalResult, Task, evaluate
from attndsl.evaluation.coverage import Bands, answers_in_reach, reach_matrix
from attndsl.evaluation.result import unpack

ROOT = Path(__file__).resolve().parent.parent
SLIDING = ROOT / "patterns" / "sliding.attn"
WINDOW = 4
# passkey at N = 32: the passkey at every distance 1..31, 7 possible passkeys (chance 1/7)
CI = ["--task", "passkey", "--seq-len", "32", "--vocab", "16", "--steps", "120",
      "--d-model", "32", "--heads", "2", "--batch", "32", "--lr", "1e-2", "--warmup", "10",
      "--test-sequences", "1024", "--seeds", "1", "--bands", "4"]


# -- tasks ---------------------------------------------------------------------------------

def test_mqar_batches_follow_zoology():
    t = Task("mqar", seq_len=64, vocab=32, items=4)
    b = t.sample(16, torch.Generator().manual_seed(3))
    x, y = b.inputs, b.labels
    for r in range(16):
        keys, vals = x[r, 0:8:2].tolist(), x[r, 1:8:2].tolist()
        assert len(set(keys)) == 4 and len(set(vals)) == 4
        assert all(1 <= k < 16 for k in keys) and all(16 <= v < 32 for v in vals)
        asked = (y[r] != -100).nonzero()[:, 0].tolist()
        assert len(asked) == 4 and all(p >= 8 and p % 2 == 0 for p in asked)
        for p in asked:
            i = keys.index(int(x[r, p]))  # the query repeats a key; the label is its value
            assert int(y[r, p]) == vals[i]
            assert int(b.hi[r, p]) == 2 * i + 1 and int(b.lo[r, p]) == 2 * i
    again = t.sample(16, torch.Generator().manual_seed(3))
    assert torch.equal(again.inputs, x) and torch.equal(again.labels, y)


def test_mqar_gaps_favour_short_distances():
    t = Task("mqar", seq_len=128, vocab=256, items=8)
    b = t.sample(2000, torch.Generator().manual_seed(0))
    pos = (b.labels != -100).nonzero()[:, 1]
    gap = (pos - 16) // 2
    # p(gap) ~ gap^-0.99 over 1..56: far more short gaps than long ones
    assert (gap < 8).sum() > 2 * (gap >= 40).sum()


def test_passkey_and_copy_batches():
    b = Task("passkey", seq_len=20, vocab=16, distance=7).sample(8, torch.Generator())
    assert (b.labels[:, :-1] == -100).all()
    assert (b.inputs[:, 12] == b.labels[:, -1]).all() and (b.inputs[:, -1] == 15).all()
    assert ((b.inputs[:, :19] >= 8).sum(dim=1) == 1).all()  # one passkey among filler
    c = Task("copy", seq_len=24, vocab=10, items=3).sample(8, torch.Generator().manual_seed(1))
    for r in range(8):
        content = [int(v) for v in c.inputs[r, :21] if v < 8]
        assert content == c.labels[r, 21:].tolist() and (c.inputs[r, 21:] == 9).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(name="mqar", seq_len=30, items=8), "mqar needs an even seq_len of at least 4 * items"),
    (dict(name="mqar", vocab=16, items=8), "an even vocab of at least 18 for 8 distinct pairs"),
    (dict(name="passkey", seq_len=16, distance=16), "passkey distance must be an int in 1..15"),
    (dict(name="copy", seq_len=10, items=8), "copy needs seq_len >= 2 * items (16)"),
    (dict(name="recall"), "unknown task 'recall': choose one of mqar, passkey, copy"),
])
def test_bad_task_sizes_are_parameter_errors(kwargs, message):
    with pytest.raises(ParameterError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        Task(**kwargs)


# -- reach ---------------------------------------------------------------------------------

def _window_reach(n: int, windows: list[int]) -> torch.Tensor:
    """Independent: a causal window w lets t read t-w+1..t; through layers the spans add."""
    span = sum(w - 1 for w in windows)
    t = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    return (j <= t) & (t - j <= span)


@pytest.mark.parametrize("windows", [[3], [3, 3], [2, 5, 4]])
def test_reach_matrix_of_stacked_windows(windows):
    n = 24
    ops = [attndsl.compile(SLIDING, "sliding_window", window=w) for w in windows]
    got = reach_matrix([op.bind(N=n) for op in ops])
    assert torch.equal(got, _window_reach(n, windows))


def test_answers_in_reach_need_the_whole_range():
    reach = _window_reach(10, [3])  # t reads t-2..t
    where = torch.tensor([5, 5, 5, 9])
    lo = torch.tensor([3, 2, 4, 0])
    hi = torch.tensor([4, 4, 5, 9])
    assert answers_in_reach(reach, where, lo, hi).tolist() == [True, False, True, False]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.integers(1, 20))
def test_answers_in_reach_is_every_position_of_the_range(n, seed, count):
    g = torch.Generator().manual_seed(seed)
    reach = torch.rand(n, n, generator=g) < 0.7
    where = torch.randint(0, n, (count,), generator=g)
    a = torch.randint(0, n, (count,), generator=g)
    b = torch.randint(0, n, (count,), generator=g)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    got = answers_in_reach(reach, where, lo, hi)
    want = [all(bool(reach[int(w), j]) for j in range(int(x), int(y) + 1))
            for w, x, y in zip(where, lo, hi)]
    assert got.tolist() == want


def test_load_refuses_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"schema": "attndsl.analysis/1"}')
    with pytest.raises(ParameterError, match="is not an attndsl eval result"):
        EvalResult.load(p)


def test_bands_cover_every_distance():
    b = Bands.even(31, 4)
    assert b.edges == ((1, 8), (9, 16), (17, 24), (25, 31))
    assert b.index(torch.tensor([1, 8, 9, 31, 0])).tolist() == [0, 0, 1, 3, -1]


# -- the seconds-sized eval (CI) ------------------------------------------------------------

@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ci.json"
    plot = out.with_suffix(".png")
    code = main(["eval", str(SLIDING), "-p", "sliding_window", "--set", f"window={WINDOW}",
                 *CI, "-o", str(out), "--plot", str(plot)])
    return code, json.loads(out.read_text()), plot


def test_ci_eval_separates_dense_from_a_short_window(ci_run, capsys):
    code, d, _ = ci_run
    assert code == 0 and not d["interrupted"]
    dense, sw = d["arms"]
    assert dense["control"] and dense["name"] == "dense (control)"
    assert sw["name"] == f"sliding_window(window={WINDOW})"
    dist = torch.tensor(d["answers"]["distance"])
    # independent reach: the passkey at distance d is read after 2 layers iff d <= 2 (w - 1)
    assert torch.equal(unpack(sw["in_reach"], len(dist)), dist <= 2 * (WINDOW - 1))
    assert unpack(dense["in_reach"], len(dist)).all()
    far = dist > 2 * (WINDOW - 1)
    chance = d["task"]["chance"]
    assert abs(chance - 1 / 7) < 1e-12

    def acc(arm, sel):
        c = arm["runs"][0]["checkpoints"][-1]
        return float(unpack(c["correct"], len(dist))[sel].float().mean())

    # beyond the window's reach: dense recalls, the window is at chance (~880 answers there,
    # so chance + 0.08 is over 6 standard errors)
    assert acc(dense, far) > 0.8
    assert acc(sw, far) < chance + 0.08
    s = sw["summary"]["equal_steps"]
    assert s["overall"]["beyond"] == "at chance"
    assert [r["status"] for r in s["bands"]] == ["partial", "beyond", "beyond", "beyond"]
    assert d["ranking"]["equal_steps"][0] == "dense (control)"


def test_ci_eval_report_and_plot(ci_run, tmp_path):
    _, d, plot = ci_run
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = EvalResult(d).text()
    assert "attndsl eval: passkey: N=32, vocab 16, distances 1..31" in text
    assert "beyond reach" in text and "at chance: cannot recall beyond the reach" in text
    assert "equal FLOPs" in text  # the window is cheaper: it also trains on to equal FLOPs
    sw = d["arms"][1]
    assert sw["summary"]["equal_flops"]["step"] > sw["summary"]["equal_steps"]["step"] == 120
    p = tmp_path / "r.json"
    EvalResult(d).save(p)
    assert EvalResult.load(p).text() == text


def test_ci_eval_records_provenance(ci_run):
    _, d, _ = ci_run
    sw = d["arms"][1]
    (prov,) = {json.dumps(p, sort_keys=True) for p in sw["patterns"]}  # same in both layers
    prov = json.loads(prov)
    assert prov["pattern"] == "sliding_window" and prov["params"] == {"window": WINDOW}
    assert prov["source_sha256"] == hashlib.sha256(SLIDING.read_bytes()).hexdigest()
    assert d["training"]["seeds"] == [0] and d["training"]["steps"] == 120
    assert d["training"]["threads"] == 1 and d["training"]["lr"] == 1e-2
    assert d["versions"]["torch"] == torch.__version__
    assert d["versions"]["attndsl"] == attndsl.__version__
    assert {"cpu", "cpus", "load_average"} <= set(d["machine"])
    assert d["model"] == {"layers": 2, "d_model": 32, "heads": 2, "head_dim": 16,
                          "mlp_ratio": 4, "positions": "learned absolute",
                          "norm": "pre-LayerNorm", "backend": "cpu"}


# -- determinism, Ctrl-C ----------------------------------------------------------------------

def _tiny(op, seeds):
    return evaluate(op, task="mqar", seq_len=16, vocab=16, items=2, steps=4, seeds=seeds,
                    d_model=16, heads=2, batch=8, test_sequences=64, bands=2,
                    equal_flops=False, progress=False)


def _outcome(res: EvalResult) -> list:
    return [(r["seed"], c["step"], c["loss"], c["correct"])
            for a in res.data["arms"] for r in a["runs"] for c in r["checkpoints"]]


def test_same_seed_same_result_and_caller_rng_untouched():
    op = attndsl.compile(SLIDING, "sliding_window", window=3)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = _tiny(op, [0, 1])
    after = torch.rand(3)
    b = _tiny(op, [1])
    assert torch.equal(before, after)  # evaluate forks the global RNG
    assert _outcome(a) == _outcome(_tiny(op, [0, 1]))
    # seed 1 alone is seed 1 of the pair: runs depend on their own seed only
    assert [o for o in _outcome(a) if o[0] == 1] == _outcome(b)
    assert [o[2] for o in _outcome(a) if o[0] == 0] != [o[2] for o in _outcome(b)]


def test_ctrl_c_stops_with_partial_results(tmp_path):
    out = tmp_path / "partial.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "attndsl.cli", "eval", str(SLIDING), "-p", "sliding_window",
           "--set", "window=4", "--task", "mqar", "--seq-len", "32", "--vocab", "32",
           "--items", "4", "--d-model", "16", "--heads", "2", "--batch", "8",
           "--test-sequences", "32", "--steps", "1000000", "--progress", "-o", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(50):  # the first progress line comes after the first step
            line = p.stderr.readline()
            if " step " in line or not line:
                break
        assert "dense (control) seed 0" in line and "step 1/1000000" in line, line
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "INTERRUPTED: partial results" in stdout
    d = json.loads(out.read_text())
    assert d["interrupted"]
    dense, sw = d["arms"]
    (run,) = dense["runs"]
    assert run["interrupted"] and 1 <= run["steps"] < 1_000_000
    assert run["checkpoints"][-1]["step"] == run["steps"]  # scored where it stopped
    assert sw["runs"] == []  # never started
    assert dense["partial"][0]["step"] == run["steps"]


# -- bad input --------------------------------------------------------------------------------

def test_patterns_eval_cannot_take_are_located_errors():
    dhsa = attndsl.compile(ROOT / "patterns" / "dhsa.attn", "dhsa", block=4, chunk=4, topk=1)
    with pytest.raises(UnsupportedError, match="depends on q and k"):
        evaluate(dhsa, steps=1, progress=False)
    na2d = attndsl.compile(ROOT / "patterns" / "neighborhood.attn", "na2d", kernel=3)
    with pytest.raises(UnsupportedError, match=r"has \[.*\] queries"):
        evaluate(na2d, steps=1, progress=False)
    doc = attndsl.compile(ROOT / "patterns" / "document.attn", "document_causal")
    with pytest.raises(UnsupportedError, match="needs the run-time input 'doc'"):
        evaluate(doc, steps=1, progress=False)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(steps=3, budget=1.0), "give steps or budget, not both"),
    (dict(steps=0), "steps must be an int >= 1, not 0"),
    (dict(budget=-1), "budget must be a positive number of seconds, not -1"),
    (dict(d_model=30, heads=4), "d_model 30 must be a multiple of heads 4"),
    (dict(seeds=[0, 0]), r"seeds must be distinct, not \[0, 0\]"),
    (dict(backend="gpu"), "unknown backend 'gpu'"),
    (dict(lr=0), "lr must be a positive number, not 0"),
])
def test_bad_options_are_parameter_errors(kwargs, message):
    op = attndsl.compile(SLIDING, "sliding_window", window=3)
    with pytest.raises((ParameterError, UnsupportedError), match=message):
        evaluate(op, progress=False, **kwargs)


def test_cli_compare_one_pattern_per_layer(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--compare", "patterns/sliding.attn:sliding_window(window=2)"
                 "+patterns/sliding.attn:sliding_window(window=5)", "--steps", "2",
                 "--seq-len", "16", "--vocab", "16", "--items", "2", "--d-model", "16",
                 "--heads", "2", "--batch", "4", "--test-sequences", "16", "--seeds", "1",
                 "--no-control", "-o", str(out)]) == 0
    (arm,) = json.loads(out.read_text())["arms"]
    assert arm["name"] == "sliding_window(window=2) + sliding_window(window=5)"
    assert [p["params"] for p in arm["patterns"]] == [{"window": 2}, {"window": 5}]
    # the stack reads 1 + 4 = 5 tokens back; an answer at distance d needs its key at d + 1,
    # and MQAR distances are odd (queries at even positions, values at odd ones): d <= 3
    assert arm["reach"]["full_distance"] == 3
    assert "sliding_window(window=2) + sliding_window(window=5)" in capsys.readouterr().out


def test_budget_sets_every_runs_steps():
    op = attndsl.compile(SLIDING, "sliding_window", window=3)
    res = op.evaluate("mqar", seq_len=16, vocab=16, items=2, budget=0.3, seeds=[0, 1],
                      d_model=16, heads=2, batch=4, test_sequences=16, equal_flops=False,
                      progress=False)
    d = res.data
    k = d["training"]["steps"]
    first = d["arms"][0]["runs"][0]
    assert k == first["steps"] >= 1 and first["cpu_seconds"] >= 0.3
    assert d["training"]["budget_seconds"] == 0.3
    assert [r["steps"] for a in d["arms"] for r in a["runs"]] == [k] * 4
    assert "(the first run's budget of 0.3 CPU s)" in res.text()


def test_op_evaluate_is_evaluate():
    op = attndsl.compile(SLIDING, "sliding_window", window=3)
    res = op.evaluate("mqar", seq_len=16, vocab=16, items=2, steps=2, seeds=1, d_model=16,
                      heads=2, batch=4, test_sequences=16, control=False, progress=False)
    assert res.arms == ["sliding_window(window=3)"]
    assert res.data["training"]["steps"] == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--compare", "patterns/sliding.attn"], "--compare takes FILE:PATTERN or"),
    (["--set", "nope=3"], "no evaluated pattern has parameter nope"),
    (["--task", "passkey", "--distance", "200"], "passkey distance must be an int in 1..127"),
    (["-o", "missing/dir/out.json"], "no folder 'missing/dir' for the results"),
])
def test_cli_eval_bad_input_exits_1_before_training(args, message, capsys):
    base = ["eval", "patterns/sliding.attn", "-p", "sliding_window", "--set", "window=4",
            "--steps", "1"]
    assert main([*base, *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

"""The fuzzer in CI (issue 10): a seeded run of 2,000 cases, each under a time limit and in
a worker under a memory limit, must give 0 failures: no traceback, no timeout, no leak, and
every error located on the right line. The long run is `python scripts/fuzz.py --cases
100000` (figures in docs/language.md, "Errors")."""

from __future__ import annotations

from fuzz import mutate, runner

CASES = 2000
SEED = 10


def test_the_fuzz_cases_are_reproducible_and_varied():
    a = [mutate.make_case(SEED, i) for i in range(300)]
    assert a == [mutate.make_case(SEED, i) for i in range(300)]
    kinds = {c["kind"].split(":")[-1].split("+")[0] for c in a}
    assert {"exponential", "deep", "recursive", "imports", "reserved", "delete", "duplicate",
            "swap", "near-miss", "extreme", "bracket", "char", "nest"} <= kinds
    assert len(mutate.CORPUS) > 30  # the standard library and the docs' examples


def test_the_classifier_fails_what_it_must():
    import attndsl
    from attndsl.errors import Span
    case = {"source": "const a = 1\nconst b = ?\n", "roots": ()}
    good = attndsl.AttnSyntaxError("x", Span("<string>", 2, 11, 2, 12, "const b = ?"))
    assert runner.classify(good, case) == ("located", "")
    wrong = attndsl.AttnSyntaxError("x", Span("<string>", 2, 11, 2, 12, "const a = 1"))
    assert runner.classify(wrong, case)[1].startswith("wrong line under the caret")
    assert runner.classify(attndsl.InputError("x"), case)[1].startswith("unlocated")
    leak = attndsl.ImportFailure(runner.CANARY, good.span)
    assert runner.classify(leak, case)[1].startswith("leak")


def test_a_seeded_fuzz_run_has_no_failures():
    res = runner.run(CASES, seed=SEED, workers=2, budget=10.0)  # CPU seconds per case
    print(runner.summary(res))
    assert res["counts"]["located"] > CASES // 2 and res["counts"]["ok"] > CASES // 20
    assert not res["failures"], runner.summary(res)
    assert res["located_share"] == 1.0


def test_a_sequence_replays_those_cases_in_that_order_in_one_worker():
    res = runner.run(0, seed=SEED, workers=1, sequence=[7, 3, 7])
    assert res["cases"] == 3 and sum(res["counts"].values()) == 3
    assert not res["failures"], runner.summary(res)

"""The abstract interpreter's integer intervals (attndsl/analysis/intervals.py) are sound:
for every operator, every value of op(x, y) with x, y drawn from the operand intervals lies
in the result interval (or the operator answers Unknown, which makes a box PARTIAL), and
exact operands give exact results. Checked against Python's own integer arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attndsl.analysis import intervals as iv

OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
       "//": lambda x, y: x // y, "%": lambda x, y: x % y, ">>": lambda x, y: x >> y,
       "<<": lambda x, y: x << y, "&": lambda x, y: x & y, "|": lambda x, y: x | y}
SMALL = st.integers(-(1 << 40), 1 << 40)
WIDTH = st.integers(0, 5000)


@st.composite
def boxes(draw, n, lo=SMALL, width=WIDTH):
    los = np.array(draw(st.lists(lo, min_size=n, max_size=n)), dtype=np.int64)
    ws = np.array(draw(st.lists(width, min_size=n, max_size=n)), dtype=np.int64)
    return iv.IV(los, los + ws)


def _operand(op: str, draw_const: bool, data) -> iv.IV:
    if op in (">>", "<<"):
        lo = data.draw(st.integers(0, 40))
        hi = lo if draw_const else lo + data.draw(st.integers(0, 20))
    elif op in ("//", "%"):
        lo = data.draw(st.sampled_from([1, 2, 3, 7, 64, 65536, 1 << 32, 4096, 1000003]))
        hi = lo if draw_const else lo + data.draw(st.integers(0, 100))
    else:
        lo = data.draw(SMALL)
        hi = lo if draw_const else lo + data.draw(st.integers(0, 5000))
    return iv.IV(np.asarray(np.int64(lo)), np.asarray(np.int64(hi)))


@settings(max_examples=400, deadline=None)
@given(op=st.sampled_from(sorted(OPS)), const=st.booleans(), point=st.booleans(),
       data=st.data())
def test_every_operator_contains_its_values(op, const, point, data):
    a = data.draw(boxes(6, lo=st.integers(-(1 << 30), 1 << 30)
                        if op == "<<" else SMALL, width=st.just(0) if point else WIDTH))
    if point:  # one value a box, held as one array (the points' one-pass path)
        a = iv.IV(a.lo, a.lo)
    b = _operand(op, const, data)
    try:
        r = iv.binop(op, a, b)
    except iv.Unknown:
        return
    lo, hi = np.broadcast_to(r.lo, (6,)), np.broadcast_to(r.hi, (6,))
    rng = np.random.default_rng(0)
    for i in range(6):
        xs = {int(a.lo[i]), int(a.hi[i])} | {int(x) for x in
                                             rng.integers(a.lo[i], a.hi[i] + 1, 20)}
        ys = {int(b.lo), int(b.hi)} | {int(y) for y in rng.integers(b.lo, b.hi + 1, 5)}
        for x in xs:
            for y in ys:
                v = OPS[op](x, y)
                assert lo[i] <= v <= hi[i], (op, x, y, v, lo[i], hi[i])


@pytest.mark.parametrize("m", [1, 3, 64, 65536, 1 << 32, 1000003])
@pytest.mark.parametrize("op", ["//", "%"])
def test_exact_operands_give_exact_quotients_and_remainders(op, m):
    xs = np.array([-(1 << 40) - 5, -m - 1, -1, 0, 1, m - 1, m, 5 * m + 2, 1 << 41],
                  dtype=np.int64)
    r = iv.binop(op, iv.IV(xs, xs), iv.IV(np.asarray(np.int64(m)), np.asarray(np.int64(m))))
    want = np.array([OPS[op](int(x), m) for x in xs], dtype=np.int64)
    assert (r.lo == want).all() and (r.hi == want).all()


def test_overflow_is_unknown_not_wrapped():
    a = iv.IV(np.array([1 << 61, 0], dtype=np.int64), np.array([1 << 62, 5], dtype=np.int64))
    four = iv.IV(np.asarray(np.int64(4)), np.asarray(np.int64(4)))
    for op in ("*", "+", "<<"):
        b = iv.IV(np.asarray(np.int64(1 << 62)), np.asarray(np.int64(1 << 62))) \
            if op == "+" else four
        with pytest.raises(iv.Unknown, match="overflow"):
            iv.binop(op, a, b)
    small = iv.IV(np.array([-3, 7], dtype=np.int64), np.array([2, 9], dtype=np.int64))
    r = iv.binop("*", small, four)
    assert list(r.lo) == [-12, 28] and list(r.hi) == [8, 36]


CMP = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
       "==": np.equal, "!=": np.not_equal}


@settings(max_examples=200, deadline=None)
@given(op=st.sampled_from(sorted(CMP)), data=st.data(),
       xs=st.lists(st.integers(-50, 50), min_size=5, max_size=5),
       ys=st.lists(st.integers(-50, 50), min_size=5, max_size=5))
def test_comparisons_of_points_are_exact_and_of_boxes_sound(op, data, xs, ys):
    x, y = np.array(xs, dtype=np.int64), np.array(ys, dtype=np.int64)
    r = iv.compare(op, iv.IV(x, x), iv.IV(y, y))
    want = CMP[op](x, y)
    assert (r.t == want).all() and (r.f == ~want).all()
    w = np.array(data.draw(st.lists(st.integers(0, 3), min_size=5, max_size=5)))
    r = iv.compare(op, iv.IV(x, x + w), iv.IV(y, y))  # may be true / false where it can be
    for i in range(5):
        vals = {bool(CMP[op](v, y[i])) for v in range(x[i], x[i] + w[i] + 1)}
        assert (True not in vals or r.t[i]) and (False not in vals or r.f[i])


def test_quotients_that_agree_become_points_and_whole_periods_one_interval():
    a = iv.IV(np.array([64, 130, -64], dtype=np.int64), np.array([127, 191, -1], dtype=np.int64))
    c = iv.IV(np.asarray(np.int64(64)), np.asarray(np.int64(64)))
    q = iv.binop("//", a, c)
    assert q.lo is q.hi and list(q.lo) == [1, 2, -1]  # later operations take one pass
    k = iv.IV(np.asarray(np.int64(40503)), np.asarray(np.int64(40503)))
    three = iv.IV(np.asarray(np.int64(3)), np.asarray(np.int64(3)))
    r = iv.binop("%", iv.binop("+", iv.binop("*", q, k), three), three)
    assert r.lo is r.hi and list(r.lo) == [(x * 40503 + 3) % 3 for x in (1, 2, -1)]
    wide = iv.binop("%", iv.IV(np.array([0, 10], dtype=np.int64),
                               np.array([70000, 80000], dtype=np.int64)),
                    iv.IV(np.asarray(np.int64(65536)), np.asarray(np.int64(65536))))
    assert np.ndim(wide.lo) == 0 and (int(wide.lo), int(wide.hi)) == (0, 65535)


@settings(max_examples=200, deadline=None)
@given(a=boxes(8, width=st.integers(0, 300)), scalar=st.booleans(), point=st.booleans())
def test_abs_is_the_tightest_interval(a, scalar, point):
    """abs over a box is [min |x|, max |x|] exactly (boxes, points and scalars)."""
    if scalar:
        a = iv.IV(np.asarray(a.lo[0]), np.asarray(a.hi[0]))
    if point:
        a = iv.IV(a.lo, a.lo)
    r = iv._b_abs(a)
    los, his = np.atleast_1d(a.lo), np.atleast_1d(a.hi)
    for i in range(len(los)):
        vals = [abs(x) for x in range(int(los[i]), int(his[i]) + 1)]
        assert np.atleast_1d(r.lo)[i] == min(vals) and np.atleast_1d(r.hi)[i] == max(vals)
    if point:
        assert r.lo is r.hi

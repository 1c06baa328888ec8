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


@settings(max_examples=300, deadline=None)
@given(op=st.sampled_from(sorted(OPS)), const=st.booleans(), data=st.data())
def test_every_operator_contains_its_values(op, const, data):
    a = data.draw(boxes(6, lo=st.integers(-(1 << 30), 1 << 30)
                        if op == "<<" else SMALL))
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

"""Pattern sources that several test modules share (kept in one place so that a change to
one reaches every backend's test)."""

# per-head rules, a head-dependent bias and a softcap: one table per head
MIXED = """
pattern mixed(N: int) {
    space seq(N)
    heads 4
    on heads 0..2 { attend k <= q and q - k < 8 }
    on heads 2..4 { attend abs(q - k) < 3 or k < 4 }
    bias -0.25 * float(abs(q - k)) + 0.5 * float(h)
    softcap 5.0
}"""

# the same with a fixed scale
MIXED_SCALED = MIXED.replace("    softcap 5.0\n", "    softcap 5.0\n    scale 0.3\n")

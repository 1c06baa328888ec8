"""What the checker's expression and statement passes share: scopes and type relations."""

from __future__ import annotations

from attndsl.lang.ir import Type

# Expression nodes of one pattern with every call of a function or pattern, every include
# and every constant expanded: what binding, masks, analyses and kernels walk. Checking
# shares each function body among its call sites, so a program can name far more; beyond
# this it is an error rather than a wait.
EXPANSION_LIMIT = 20_000
# Keywords of the Python API next to which run-time inputs and parameters are passed as
# keyword arguments (op(q, k, v, backend=..., doc=...), attndsl.compile(src, pattern=...,
# N=...)): such a name could never be passed, so it cannot name an input or a parameter.
# tests/test_hardening.py keeps these in step with the signatures in api.py and export.py.
RESERVED_INPUTS = {
    "backend": "op(...)", "scale": "op(...)", "layers": "op.analyze(...)",
    "query": "op.analyze(...)", "head_dim": "op.analyze(...)", "progress": "op.analyze(...)",
    "keep_sets": "op.analyze(...)", "source": "op.path(...)", "target": "op.path(...)",
    "name": "export(...)", "flex": "export(...)", "q_start": "op(...)",
    "key_padding_mask": "op(...)", "lengths": "op(...)", "dropout_p": "op(...)",
    "generator": "op(...)", "queries": "op(...)", "cache": "attndsl.nn.Attention(...)",
    "softcap": "op(...)", "order": "op.block_mask(...)", "block_size": "op.block_mask(...)",
    "device": "op.block_mask(...)",
}
RESERVED_PARAMS = {"pattern": "attndsl.compile(...)", "import_roots": "attndsl.compile(...)"}
ERROR = Type("error")  # an erroneous sub-expression: compatible with everything, no cascades
CONTEXT = ("q", "k", "h")
SPACE_KINDS = {"seq": ("i",), "grid": ("y", "x"), "volume": ("t", "y", "x"), "channels": ("c",)}
POOLS = {"keys": ("max", "mean"), "queries": ("max", "mean"),
         "values": ("mean", "max", "expectation")}


class Scope:
    """Names visible at one point: name -> (ref, Type) or, for pattern-level lets,
    (ref, Type, unique name, the context names and inputs it depends on)."""

    def __init__(self, parent: Scope | None = None):
        self.parent = parent
        self.names: dict[str, tuple] = {}

    def get(self, name: str):
        s = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        return None

    def all_names(self):
        s, out = self, set()
        while s is not None:
            out |= set(s.names)
            s = s.parent
        return out

    def let_deps(self, uid: str) -> frozenset:
        """What the pattern-level let with unique name `uid` depends on."""
        s = self
        while s is not None:
            for entry in s.names.values():
                if len(entry) > 2 and entry[2] == uid:
                    return entry[3]
            s = s.parent
        return frozenset()


def kind_ok(want: str, have: str) -> bool:
    """A value of kind `have` may stand where `want` is expected (ints widen to float)."""
    return have == "error" or want == have or (want == "float" and have == "int")


def join_n(a: Type, b: Type):
    """The common per-axis width of two operands (None: scalar), or False if they differ."""
    if a.n is None:
        return b.n
    if b.n is None or a.n == b.n:
        return a.n
    return False

"""Every cache of attndsl, declared here, bounded, and thread-safe.

Caches hold values computed from frozen keys (bound patterns, plans, generated source);
run-time inputs are never written into them except as part of a key. `CACHES` lists them
all, so tests can check every bound and `clear_all()` can empty them.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from attndsl.errors import UnsupportedError


def cache_dir() -> str:
    """The kernel cache (generated Triton modules, the native CPU kernel): $ATTNDSL_CACHE, or
    ~/.cache/attndsl. attndsl imports Python and loads machine code from it, so it is
    created readable and writable by its owner only, and a directory that belongs to
    another user or that others may write to is refused."""
    d = os.environ.get("ATTNDSL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attndsl")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.stat(d)
    except OSError as e:
        raise UnsupportedError(f"cannot create the kernel cache directory '{d}': "
                               f"{e.strerror or e}; set ATTNDSL_CACHE to another "
                               "directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsupportedError(f"the kernel cache '{d}' is not a directory; set "
                               "ATTNDSL_CACHE to another directory")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise UnsupportedError(f"the kernel cache directory '{d}' belongs to another user; "
                               "attndsl imports Python from it: set ATTNDSL_CACHE to a "
                               "directory of your own")
    if st.st_mode & 0o022:
        raise UnsupportedError(f"the kernel cache directory '{d}' can be written by other "
                               f"users (mode {stat.S_IMODE(st.st_mode):o}); attndsl imports "
                               "Python from it: make it writable by its owner only (chmod "
                               "go-w) or set ATTNDSL_CACHE to another directory")
    return d


class LRU:
    """A least-recently-used map of at most `maxsize` entries. `get_or_create` builds a
    missing value outside the lock (two threads may build it once each; one is kept)."""

    def __init__(self, name: str, maxsize: int, doc: str, on_evict=None):
        self.name = name
        self.maxsize = maxsize
        self.doc = doc
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict = OrderedDict()
        self._real_lock = threading.Lock()
        self._on_evict = on_evict

    @property
    def _lock(self):
        # torch.compile traces a call once, single-threaded, and cannot enter a lock
        if torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return self._real_lock

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        return key in self._data

    def get(self, key: Hashable, default=None):
        with self._lock:
            return self._hit(key, default)

    def _hit(self, key, default):
        """The entry (made most recent) or `default`, counting the hit or miss; under the
        lock."""
        if key in self._data:
            self._data.move_to_end(key)
            self.hits += 1
            return self._data[key]
        self.misses += 1
        return default

    def values(self) -> list:
        """A snapshot of the cached values (no hit or miss counted)."""
        with self._lock:
            return list(self._data.values())

    def put(self, key: Hashable, value) -> None:
        evicted = []
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                evicted.append(self._data.popitem(last=False))
        if self._on_evict is not None:
            for k, v in evicted:
                self._on_evict(k, v)

    def get_or_create(self, key: Hashable, factory: Callable[[], object]):
        missing = object()
        with self._lock:
            value = self._hit(key, missing)
        if value is not missing:
            return value
        value = factory()
        with self._lock:
            if key in self._data:  # another thread built it meanwhile: keep one
                return self._data[key]
        self.put(key, value)
        return value

    def on_evict(self, fn) -> None:
        """Call fn(key, value) for every entry that leaves the cache."""
        self._on_evict = fn

    def clear(self) -> None:
        with self._lock:
            items = list(self._data.items())
            self._data.clear()
        if self._on_evict is not None:
            for k, v in items:
                self._on_evict(k, v)

    def info(self) -> dict:
        return {"size": len(self._data), "maxsize": self.maxsize, "hits": self.hits,
                "misses": self.misses}


class Workspace:
    """Scratch tensors kept between calls, one set per thread (a fresh large tensor costs a
    page fault per 4 KiB page, e.g. 10 ms for 17 MiB, a sixth of an na2d forward's
    kernel). At most `maxsize` named buffers a thread, each kept only while
    it is at most `max_bytes`; larger requests get a fresh tensor."""

    def __init__(self, name: str, maxsize: int, max_bytes: int, doc: str):
        self.name = name
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.doc = doc
        self.hits = 0
        self.misses = 0
        self._local = threading.local()

    def _bufs(self) -> dict:
        if not hasattr(self._local, "bufs"):
            self._local.bufs = {}
        return self._local.bufs

    def __len__(self) -> int:
        return len(self._bufs())

    def get(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape`; the caller must not keep it past its call."""
        nbytes = math.prod(shape) * dtype.itemsize
        bufs = self._bufs()
        if nbytes > self.max_bytes:
            self.misses += 1
            return torch.empty(shape, dtype=dtype)
        b = bufs.get(name)
        if b is None or b.numel() < nbytes:
            if b is None and len(bufs) >= self.maxsize:
                bufs.pop(next(iter(bufs)))
            b = bufs[name] = torch.empty(nbytes, dtype=torch.uint8)
            self.misses += 1
        else:
            self.hits += 1
        return b[:nbytes].view(dtype).view(shape)

    def clear(self) -> None:
        self._bufs().clear()

    def info(self) -> dict:
        return {"size": len(self), "maxsize": self.maxsize, "hits": self.hits,
                "misses": self.misses}


PARSER = LRU("parser", 1, "the LALR parser built from grammar/attn.lark (lang/parser.py)")
BIND = LRU("bind", 512, "patterns called from expressions, included or averaged, bound per "
           "parameter values (semantics/bind.py)")
PLANS = LRU("plans", 16, "token orders and block tables per (bound pattern, block sizes, "
            "order, run-time inputs) (codegen/plan/tables.py)")
BLOCKS = LRU("blocks", 64, "the block sizes a target's planner chose per (bound pattern, "
             "target, run-time inputs) (codegen/plan/tables.py)")
ORDERS = LRU("orders", 64, "the token orders the planner chose per (bound pattern, block "
             "sizes, run-time inputs) (codegen/plan/tables.py)")
NEEDED = LRU("needed", 256, "attended entries per query block, proven-PARTIAL pairs counted "
             "on demand, per (plan, table) (codegen/plan/tables.py)")
CPU_PLANS = LRU("cpu_plans", 16, "the CPU backend's work groups and PARTIAL-block masks per "
                "plan (codegen/cpu/plan.py)")
CPU_FUSED = LRU("cpu_fused", 16, "the CPU backend's fused-path work units and additive masks "
                "per (plan, table, head, dtype) (codegen/cpu/fused.py)")
NATIVE_TASKS = LRU("native_tasks", 16, "flash.c's task lists (addresses into the work units "
                    "they keep alive) per (plan, batch, kv heads, query heads per kv head) "
                    "(codegen/cpu/fused.py)")
KERNEL_SOURCES = LRU("kernel_sources", 64, "generated Triton source per (bound pattern, "
                     "token orders) (codegen/triton/generate.py)")
KERNELS = LRU("kernels", 64, "a bound pattern's kernel module and launch facts, per (module "
              "file, bound pattern) (codegen/triton/runtime.py)")
KERNEL_MODULES = LRU("kernel_modules", 32, "imported generated Triton modules per source "
                     "digest (codegen/triton/runtime.py)")
DEVICE_TABLES = LRU("device_tables", 16, "block tables copied to a device, per (plan, "
                    "device) (codegen/triton/runtime.py)")
FLEX_CODE = LRU("flex_code", 64, "the generated FlexAttention mask_mod / score_mod, compiled "
                "Python per bound pattern (codegen/flex.py)")
HF_OPS = LRU("hf_ops", 256, "family ops of registered transformers attention, per (source, "
             "pattern, parameters) of a layer (integrations/transformers.py)")
CP_LAYOUTS = LRU("cp_layouts", 16, "context parallelism: the attended pairs per query block, "
                 "and the blocks of each rank and the key blocks it receives, per (plans, "
                 "ranks, dispatch) (distributed/plan.py)")
CP_PLANS = LRU("cp_plans", 16, "context parallelism: one rank's restricted plans and exchange "
               "rows, per (plans, ranks, rank, dispatch) (distributed/plan.py)")
NATTEN_OPS = LRU("natten_ops", 64, "the family op of each NATTEN configuration (dimensions, "
                 "kernel, stride, dilation, causal) of attndsl.natten (natten.py)")
WORKSPACE = Workspace("workspace", 8, 1 << 31, "the native CPU backward's key-gradient "
                      "accumulators, per thread (codegen/cpu/fused.native_backward)")

CACHES = (PARSER, BIND, PLANS, BLOCKS, ORDERS, NEEDED, CPU_PLANS, CPU_FUSED, NATIVE_TASKS,
          KERNEL_SOURCES, KERNELS, KERNEL_MODULES, DEVICE_TABLES, FLEX_CODE, HF_OPS,
          CP_LAYOUTS, CP_PLANS, NATTEN_OPS, WORKSPACE)


# Not a cache: every live Op by the name a torch.compile graph calls it by (api.py). Weak,
# so it holds exactly the Ops that exist.
OPS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def info() -> dict:
    return {c.name: c.info() for c in CACHES}


def clear_all() -> None:
    for c in CACHES:
        c.clear()


class lazy:  # noqa: N801 - used as a decorator, like functools.cached_property
    """A property computed on first use and stored on the instance: functools.cached_property
    without its lock (which torch.compile cannot trace); a race computes the value twice, the
    same value."""

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        d = obj.__dict__
        if self.name not in d:
            d[self.name] = self.fn(obj)
        return d[self.name]

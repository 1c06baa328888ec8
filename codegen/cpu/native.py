"""backend="cpu": the native kernels (flash.c, forward and backward), compiled on first use.

The C source ships in the package; the first forward that can use it compiles it with the
machine's C compiler ($CC, else cc) into the kernel cache (attndsl.caches.cache_dir,
keyed by the source, the flags and the compiler's version) and loads it through ctypes, which
releases the GIL while it runs. Where there is no compiler, no AVX2 + FMA, or
ATTNDSL_NATIVE=0, `kernel()` is None and the backend keeps ATen's kernel (fused.py); a
failed build is reported once, as a warning, never as an error.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from attndsl.caches import cache_dir

SOURCE = Path(__file__).with_name("flash.c")
FLAGS = ("-O3", "-std=c11", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread",
         "-fno-math-errno")
# Tried first: flash.c then runs on the process's OpenMP threads, torch's own (its libgomp is
# loaded by then), rather than racing them for the cores with a pthread pool; measured
# 7-15% faster forwards on na2d and dilated na2d (2-core EPYC). Without it: pthreads.
OPENMP = ("-fopenmp",)
KC = 256  # flash.c's keys per chunk: key blocks must fit one
_LOCK = threading.Lock()
_STATE: dict = {}  # the one loaded library (or None once a build failed): built once


def kernel():
    """The loaded library, or None where it cannot run here."""
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"] = _load()
        return _STATE["lib"]


def _enabled() -> bool:
    if os.environ.get("ATTNDSL_NATIVE", "1") in ("0", "", "off"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _load():
    if not _enabled():
        return None
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
        src = SOURCE.read_bytes()
        tag = (repr(FLAGS + OPENMP) + version).encode()
        key = hashlib.sha256(src + tag).hexdigest()[:16]
        path = Path(cache_dir()) / f"attndsl_flash_{key}.so"
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except Exception as e:  # noqa: BLE001 (a build that fails for any reason: ATen's kernel)
        warnings.warn(f"attndsl: the native CPU kernel could not be built ({e}); using "
                      "ATen's kernel", RuntimeWarning, stacklevel=3)
        return None
    for name in ("attndsl_flash_fwd", "attndsl_flash_bwd", "attndsl_unpack",
                 "attndsl_flash_count"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


_P, _I = ctypes.c_void_p, ctypes.c_int64


class FwdArgs(ctypes.Structure):
    """flash.c's fwd_args (field for field)."""

    _fields_ = [("q", _P), ("o", _P), ("lse", _P), ("sq_b", _I), ("sq_h", _I), ("sq_n", _I),
                ("nq", _I), ("qpos", _P), ("qvalid", _P), ("k", _P), ("v", _P),
                ("sk_b", _I), ("sk_h", _I), ("sk_n", _I), ("sv_b", _I), ("sv_h", _I),
                ("sv_n", _I), ("kpos", _P), ("tasks", _P),
                ("ntasks", _I), ("H", _I), ("HKV", _I), ("R", _I), ("nqb", _I), ("bq", _I),
                ("D", _I), ("nkb", _I), ("bk", _I), ("scale", ctypes.c_float),
                ("threads", ctypes.c_int), ("bits", ctypes.c_int)]


class BwdArgs(ctypes.Structure):
    """flash.c's bwd_args."""

    _fields_ = [("f", FwdArgs), ("dout", _P), ("sd_b", _I), ("sd_h", _I), ("sd_n", _I),
                ("dq", _P), ("acc", _P), ("touched", _P), ("G", _I)]


class UnpackArgs(ctypes.Structure):
    """flash.c's unpack_args."""

    _fields_ = [("acc", _P), ("parts", _I), ("ps", _I), ("touched", _P), ("ts", _I),
                ("pos", _P), ("valid", _P),
                ("out", _P), ("so_b", _I), ("so_h", _I), ("so_n", _I), ("G", _I), ("HKV", _I),
                ("nkb", _I), ("bk", _I), ("D", _I), ("threads", ctypes.c_int),
                ("assign", ctypes.c_int)]


def _build(cc: str, path: Path) -> None:
    """Compiles into a temporary file beside `path`, then renames it (processes that build
    at once each write their own file; the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        for extra in (OPENMP, ()):  # a compiler without OpenMP: pthreads
            res = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"],
                                 capture_output=True, text=True, timeout=300)
            if res.returncode == 0:
                break
        if res.returncode != 0:
            raise OSError(f"{cc} exited with {res.returncode}: {res.stderr.strip()[:500]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def usable(bq: int, bk: int, d: int, dtype: torch.dtype) -> bool:
    """Whether flash.c takes these blocks (it computes in fp32, 16 lanes at a time)."""
    return dtype == torch.float32 and d % 16 == 0 and bk % 16 == 0 and bk <= KC


def forward(args: FwdArgs) -> None:
    """Runs flash.c's forward; every address in `args` alive for the call."""
    args.threads = torch.get_num_threads()
    _run("attndsl_flash_fwd", args)


def count(args: FwdArgs) -> int:
    """The elements (query rows x keys) flash.c's forward and backward compute for `args`'
    tasks: keys that no query of a 16-row item attends leave its chunks (live_keys)."""
    out = ctypes.c_int64(0)
    if kernel().attndsl_flash_count(ctypes.byref(args), ctypes.byref(out)) != 0:
        raise RuntimeError("attndsl's native CPU kernel attndsl_flash_count rejected its "
                           "arguments")
    return out.value


def backward(args: BwdArgs) -> None:
    """Runs flash.c's backward (args.f.threads set: one accumulator pair a thread)."""
    _run("attndsl_flash_bwd", args)


def unpack(acc: torch.Tensor, touched: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
           out: torch.Tensor, assign: bool = False) -> None:
    """out [B, HKV, N, D] += (assign: =) acc [parts, B HKV, nkb, bk, D] summed over the parts
    whose block is touched ([parts, B HKV, nkb] uint8), each block position's row at its key
    row (valid positions only)."""
    parts, G, nkb, bk, D = acc.shape
    _run("attndsl_unpack", UnpackArgs(
        acc.data_ptr(), parts, acc.stride(0), touched.data_ptr(), touched.stride(0),
        pos.data_ptr(), valid.data_ptr(), out.data_ptr(),
        out.stride(0), out.stride(1), out.stride(2), G, out.shape[1], nkb, bk, D,
        torch.get_num_threads(), int(assign)))


def _run(name: str, args) -> None:
    if getattr(kernel(), name)(ctypes.byref(args)) != 0:
        raise RuntimeError(f"attndsl's native CPU kernel {name} rejected its arguments")

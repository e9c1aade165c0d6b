"""Build and call lowbit's CPU kernels (``lowbit_cpu.c``) through ctypes.

The C sources are compiled with gcc on first use into a cache directory (``$LOWBIT_KERNEL_CACHE``,
default ``~/.cache/lowbit/kernels``), keyed by the source's hash, and loaded once per process.  The
library picks its instruction set (AVX-512 VNNI, AVX2 or generic C) from cpuid when it loads.
Only numpy and the standard library: the decode benchmark loads this file on machines without
lowbit's compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

try:
    from lowbit.errors import LowbitError as _Base
except ImportError:  # loaded standalone (benchmarks on a bare machine)
    _Base = RuntimeError

__all__ = ["KernelBuildError", "build", "library", "ISA_NAMES", "isa", "set_isa", "set_threads", "linear", "gemm_q",
           "quantize_act", "stream_read", "CpuLinear"]

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / name
           for name in ("lowbit_cpu.c", "lowbit_decode.c", "lowbit_pool.c", "lowbit_grid.c")]
CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off", "-std=gnu11", "-pthread"]
ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512-vnni"}
_LIB: ctypes.CDLL | None = None


class KernelBuildError(_Base):
    """The C kernels could not be built (no gcc, or a compile error)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_KERNEL_CACHE") or Path.home() / ".cache" / "lowbit" / "kernels")


def build(force: bool = False, sources=None, extra: tuple[str, ...] = (), stem: str = "lowbit_cpu") -> Path:
    """Compile the kernels (or ``sources`` with ``extra`` flags) once per source version; the library's path."""
    sources = list(sources or SOURCES)
    src = b"".join(p.read_bytes() for p in sources)
    tag = hashlib.sha256(src + " ".join(CFLAGS + list(extra)).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{stem}-{tag}.so"
    if out.is_file() and not force:
        return out
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise KernelBuildError(f"lowbit-cpu kernels: C compiler '{cc}' not found",
                               hint="install gcc (or set CC), or lower without kernels=lowbit-cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    proc = subprocess.run([cc, *CFLAGS, "-o", tmp, *map(str, sources), *extra, "-lm"], capture_output=True, text=True)
    if proc.returncode:
        os.unlink(tmp)
        raise KernelBuildError(f"lowbit-cpu kernels: {cc} failed: {proc.stderr.strip()[:500]}")
    os.replace(tmp, out)  # atomic: concurrent builders never load a half-written library
    logger.info("built %s", out)
    return out


def library() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(build()))
        P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.lowbit_linear.argtypes = [I, I, I, I, I, I, P, P, P, P, P, P]
        lib.lowbit_gemm_q.argtypes = [I, I, I, I, I, P, P, P, P, P, P, P]
        lib.lowbit_quantize_act.argtypes = [I, I, I, I, P, P, P, P]
        lib.lowbit_quantize_act.restype = None
        lib.lowbit_set_threads.argtypes = [I]
        lib.lowbit_set_threads.restype = None
        lib.lowbit_set_isa.argtypes = [I]
        lib.lowbit_stream_read.argtypes = [P, ctypes.c_size_t, I]
        lib.lowbit_stream_read.restype = ctypes.c_uint64
        lib.lowbit_rmsnorm.argtypes = [I, P, P, F, P]
        lib.lowbit_rope_attend.argtypes = [I, I, I, I, I, P, P, P, P, P, P, P]
        lib.lowbit_swiglu.argtypes = [I, P, P]
        lib.lowbit_add.argtypes = [I, P, P]
        lib.lowbit_grid_linear.argtypes = [I, I, I, I, I, I, P, P, P, P, I, P, P, P, P, P]
        lib.lowbit_grid_set_fast.argtypes = [I]
        for name in ("lowbit_rmsnorm", "lowbit_rope_attend", "lowbit_swiglu", "lowbit_add"):
            getattr(lib, name).restype = None
        _LIB = lib
    return _LIB


def isa() -> str:
    """The instruction-set path in use."""
    return ISA_NAMES[library().lowbit_isa()]


def set_isa(name: str) -> str:
    """Force a path ("generic", "avx2", "avx512-vnni"); one this CPU lacks is refused.  Returns the path in use."""
    code = {v: k for k, v in ISA_NAMES.items()}[name]
    return ISA_NAMES[library().lowbit_set_isa(code)]


def set_threads(n: int) -> None:
    """Threads per kernel call, the caller included (work pool, ``lowbit_pool.c``; 0: OpenMP's default count,
    i.e. OMP_NUM_THREADS or the cores)."""
    library().lowbit_set_threads(int(n))


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def quantize_act(x: np.ndarray, kp: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 [M, K] → (xq int8 [M, Kp], scales float32 [M, Kp/G], sums int32 [M, Kp/G])."""
    x = np.ascontiguousarray(x, np.float32)
    m, k = x.shape
    ng = kp // group
    xq, xs, xsum = np.empty((m, kp), np.int8), np.empty((m, ng), np.float32), np.empty((m, ng), np.int32)
    library().lowbit_quantize_act(m, k, kp, group, _ptr(x), _ptr(xq), _ptr(xs), _ptr(xsum))
    return xq, xs, xsum


def gemm_q(p, xq: np.ndarray, xs: np.ndarray, xsum: np.ndarray) -> np.ndarray:
    """y [M, N] from pre-quantized activations (see :func:`quantize_act`) and a :class:`~.layout.Packed`."""
    m = xq.shape[0]
    y = np.empty((m, p.n), np.float32)
    rc = library().lowbit_gemm_q(p.bits, m, p.kp, p.n, p.group, _ptr(p.codes), _ptr(p.scales), _ptr(p.zeros),
                                 _ptr(np.ascontiguousarray(xq)), _ptr(np.ascontiguousarray(xs, np.float32)),
                                 _ptr(np.ascontiguousarray(xsum, np.int32)), _ptr(y))
    if rc:
        raise ValueError(f"lowbit_gemm_q: bad arguments (bits={p.bits}, K={p.kp}, N={p.n}, group={p.group})")
    return y


def linear(p, x: np.ndarray, out: np.ndarray | None = None, workspace: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W for x float32 [..., K] (activations quantized to int8 per group inside the kernel)."""
    x2 = np.ascontiguousarray(x, np.float32).reshape(-1, p.k)
    m = x2.shape[0]
    y = out if out is not None else np.empty((m, p.n), np.float32)
    ws = workspace if workspace is not None else np.empty(m * p.kp + 8 * m * (p.kp // p.group) + 64, np.uint8)
    rc = library().lowbit_linear(p.bits, m, p.k, p.kp, p.n, p.group, _ptr(x2), _ptr(p.codes), _ptr(p.scales),
                                 _ptr(p.zeros), _ptr(y), _ptr(ws))
    if rc:
        raise ValueError(f"lowbit_linear: bad arguments (bits={p.bits}, K={p.k}, N={p.n}, group={p.group})")
    return y.reshape(*x.shape[:-1], p.n)


class CpuLinear:
    """A packed linear with its buffers preallocated for a fixed number of rows (decode loops):
    ``run_ptr(x_address)`` writes ``y`` (address ``y_ptr``) without any numpy call."""

    def __init__(self, packed, rows: int = 1):
        self.p, self.rows = packed, rows
        self.y = np.empty((rows, packed.n), np.float32)
        self.ws = np.empty(rows * packed.kp + 8 * rows * (packed.kp // packed.group) + 64, np.uint8)
        self.y_ptr = _ptr(self.y)
        p = packed
        args = (_ptr(p.codes), _ptr(p.scales), _ptr(p.zeros), self.y_ptr, _ptr(self.ws))
        fn = library().lowbit_linear
        self.run_ptr = lambda xp: fn(p.bits, rows, p.k, p.kp, p.n, p.group, xp, *args)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.run_ptr(np.ascontiguousarray(x, np.float32).ctypes.data)  # x: [rows, K]
        return self.y


def stream_read(nbytes: int = 1 << 30, reps: int = 5, threads: int = 0) -> float:
    """Read bandwidth in bytes/s (best of ``reps`` passes summing ``nbytes`` of uint64 on the kernels' work pool)."""
    import time

    lib = library()
    set_threads(threads)
    a = np.ones(nbytes // 8, np.uint64)
    lib.lowbit_stream_read(_ptr(a), a.size, 1)  # touch
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        lib.lowbit_stream_read(_ptr(a), a.size, 1)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best

"""TVM side of lowbit's CPU kernels: a packed function a compiled Relax module calls, and the weight
operands ``prepare_for_tvm(kernels="lowbit-cpu")`` writes.

``lower-tvm{kernels=lowbit-cpu}`` lowers each low-bit linear to
``relax.call_dps_packed("lowbit.cpu_linear", [x [M, K], codes, scales, zeros], out_ty=[M, N])`` where the
operands are :func:`lowbit.backends.kernels.layout.repack`'s arrays (codes ``[NT, ng, bits, 2G]``, so
bits and G travel in the shape).  The artifact's ``.json`` records ``"kernels": "lowbit-cpu"``;
:class:`lowbit.runtime.tvm_runner.TvmSession` calls :func:`register` before it runs the module.
"""

from __future__ import annotations

import logging

import numpy as np

from .layout import repack

__all__ = ["FUNC", "register", "kernel_operands", "matmul3bit_operands"]

logger = logging.getLogger(__name__)

FUNC = "lowbit.cpu_linear"
_REGISTERED: str | bool = False


def kernel_operands(codes_kn: np.ndarray, scale_gn: np.ndarray, zero_gn: np.ndarray, bits: int, block: int):
    """(codes, scales, zeros) in the kernels' layout from codes [K, N] and per-group scale/zero [G, N];
    None where the kernels cannot run the format (the TIR kernel runs it instead)."""
    if bits not in (2, 3, 4, 8) or (block % 32 and not (block == 16 and bits <= 3)):
        return None
    z = np.asarray(zero_gn)
    if np.any(z != np.round(z)) or z.min() < 0 or z.max() >= (1 << bits):
        return None  # non-integer zero points: not a lowbit format
    p = repack(np.ascontiguousarray(codes_kn.T), np.ascontiguousarray(scale_gn.T, np.float32),
               np.ascontiguousarray(z.T).astype(np.uint8), bits, block)
    return p.codes, p.scales, p.zeros


def matmul3bit_operands(node):
    """Unsigned codes [K, N], scales [G, N], zero points [G, N] (float) and block of a ``lowbit.MatMul3Bit``."""
    from lowbit.ops.float_ops import unpack3

    _, packed, scales, zps = node.inputs
    block = node.attributes.get_int("block_size")
    s, z = scales.const_value.numpy().astype(np.float32), zps.const_value.numpy()
    k = int(node.metadata_props.get("lowbit.k", 0)) or int(block * s.shape[1])
    k = min(k, packed.const_value.shape[1] // 3 * 8)
    codes = unpack3(packed.const_value.numpy(), k)  # [N, K]
    return codes.T, s.T, z.T.astype(np.float32), 3, block, k


def _register_c() -> bool:
    """Build ``lowbit_tvm.c`` against the installed tvm-ffi header and register it (no Python per call)."""
    import ctypes
    from pathlib import Path

    import tvm_ffi.libinfo as info

    from . import cpu

    kernels = cpu.build()
    cpu.library()  # loaded first: the bridge links to this very file, so they share one copy
    lib_ffi = Path(info.find_libtvm_ffi())
    flags = [f"-I{p}" for p in info.include_paths()] + [str(kernels), f"-L{lib_ffi.parent}", "-ltvm_ffi",
                                                        f"-Wl,-rpath,{lib_ffi.parent}", f"-Wl,-rpath,{kernels.parent}"]
    path = cpu.build(sources=[Path(__file__).resolve().parent / "lowbit_tvm.c"], extra=tuple(flags), stem="lowbit_tvm")
    bridge = ctypes.CDLL(str(path))
    return bridge.lowbit_tvm_register() == 0


def _register_python() -> None:
    import tvm

    from . import cpu

    lib = cpu.library()
    workspaces: dict[int, np.ndarray] = {}

    def cpu_linear(x, codes, scales, zeros, out):
        m, k = (int(d) for d in x.shape)
        _, nb, bits, g2 = (int(d) for d in codes.shape)
        kp, ng, n = nb * (g2 // 2), int(scales.shape[1]), int(out.shape[1])
        group = kp // ng
        need = m * kp + 8 * m * ng + 64
        ws = workspaces.get(need)
        if ws is None:
            ws = workspaces[need] = np.empty(need, np.uint8)
        rc = lib.lowbit_linear(bits, m, k, kp, n, group, x.data_ptr(), codes.data_ptr(), scales.data_ptr(),
                               zeros.data_ptr(), out.data_ptr(), ws.ctypes.data)
        if rc:
            raise ValueError(f"{FUNC}: bad operands (bits={bits}, K={k}, N={n}, group={group})")

    tvm.register_global_func(FUNC, cpu_linear, override=True)


def register(prefer_c: bool | None = None) -> str:
    """Register ``lowbit.cpu_linear``: out[M, N] = x[M, K] @ W through the C kernels.  The C packed function
    is used where it builds, else a Python one (a few µs more per call); ``prefer_c=None`` keeps whichever is
    registered already.  Returns which ("c" or "python")."""
    global _REGISTERED
    if _REGISTERED and (prefer_c is None or (_REGISTERED == "c") == prefer_c):
        return _REGISTERED
    prefer_c = True if prefer_c is None else prefer_c
    how = "python"
    if prefer_c:
        try:
            how = "c" if _register_c() else "python"
        except Exception as exc:  # noqa: BLE001 - no header/compiler: the Python bridge still works
            logger.info("C packed function unavailable (%s); using the Python one", exc)
    if how == "python":
        _register_python()
    _REGISTERED = how
    logger.debug("registered %s (%s bridge)", FUNC, how)
    return how

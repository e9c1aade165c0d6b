"""Latency model of a backend: microseconds of one linear ``[M, K] x [K, N]`` per weight bit width.

A table is JSON ``{"backend": ..., "m": M, "entries": [{"k", "n", "bits", "us"}...]}`` measured
once per backend and machine (:func:`measure_table`) and shipped beside the recipes
(``lowbit/mixed/tables/<name>.json``).  Lookups use the exact shape when measured, else a per-bit
least-squares fit ``us = a + c·K·N`` over the table.  MatMulNBits has no 3-bit kernel: a 3-bit
layer is costed as 4-bit unless the table has 3-bit rows; 16 bits is the float MatMul.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["LatencyTable", "measure_table", "TABLE_DIR"]

TABLE_DIR = Path(__file__).resolve().parent / "tables"


class LatencyTable:
    def __init__(self, data: dict):
        self.data = data
        self.exact = {(e["k"], e["n"], e["bits"]): float(e["us"]) for e in data["entries"]}
        self.fits = {}
        for bits in {e["bits"] for e in data["entries"]}:
            rows = [e for e in data["entries"] if e["bits"] == bits]
            a = np.array([[1.0, e["k"] * e["n"]] for e in rows])
            y = np.array([e["us"] for e in rows])
            self.fits[bits] = np.linalg.lstsq(a, y, rcond=None)[0] if len(rows) > 1 else np.array([y[0], 0.0])

    @classmethod
    def load(cls, name_or_path: str) -> "LatencyTable":
        path = Path(name_or_path)
        if not path.suffix:
            path = TABLE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            known = ", ".join(p.stem for p in TABLE_DIR.glob("*.json")) or "none"
            raise LowbitError(f"latency table '{name_or_path}' not found", hint=f"built-in tables: {known}")
        return cls(json.loads(path.read_text()))

    def _bits(self, bits: int) -> int:
        if bits in self.fits:
            return bits
        higher = sorted(b for b in self.fits if b >= bits)
        if not higher:
            raise LowbitError(f"latency table has no row for {bits} bits or more")
        return higher[0]

    def us(self, k: int, n: int, bits: int) -> float:
        if n == 0:
            return 0.0
        b = self._bits(bits)
        if (k, n, b) in self.exact:
            return self.exact[(k, n, b)]
        a, c = self.fits[b]
        return max(float(a + c * k * n), 0.0)


def _matmulnbits_model(k: int, n: int, bits: int, block: int):
    from onnx import TensorProto, helper

    nb = -(-k // block)
    rng = np.random.default_rng(0)
    if bits >= 16:
        w = helper.make_tensor("W", TensorProto.FLOAT, [k, n], rng.standard_normal(k * n).astype(np.float32))
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        inits = [w]
    else:
        blob = block * bits // 8
        b = rng.integers(0, 256, (n, nb, blob), dtype=np.uint8)
        inits = [helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
                 helper.make_tensor("S", TensorProto.FLOAT, [n * nb], np.full(n * nb, 0.01, np.float32))]
        node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "lin", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def measure_table(shapes: list[tuple[int, int]], bits=(2, 4, 8, 16), m: int = 1, block: int = 32,
                  threads: int = 1, repeat: int = 200, backend: str = "ort-cpu") -> dict:
    """Time each shape × bits on ORT's CPU EP (median of ``repeat`` runs after warm-up)."""
    from lowbit.ir.sessions import make_session

    entries = []
    x = np.random.default_rng(1).standard_normal((m, 1)).astype(np.float32)
    for k, n in shapes:
        a = np.repeat(x, k, axis=1)
        for b in bits:
            sess = make_session(_matmulnbits_model(k, n, b, block), threads=threads, matmulnbits_accuracy_level=None)
            for _ in range(10):
                sess.run(None, {"A": a})
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                sess.run(None, {"A": a})
                times.append(time.perf_counter() - t0)
            entries.append({"k": k, "n": n, "bits": b, "us": round(float(np.median(times)) * 1e6, 2)})
    return {"backend": backend, "m": m, "block": block, "threads": threads, "entries": entries}

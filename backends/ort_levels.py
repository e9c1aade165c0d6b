"""Which MatMulNBits ``accuracy_level`` ORT runs fast for each bit width, from the backend's latency table.

ORT 1.31's CPU MatMulNBits has fast kernels for every bit width at accuracy level 4 (int8 activations
per block), but at level 0 (float activations) only for 4 bits: 2- and 8-bit level-0 layers run a
reference kernel 25–35× slower than fp32.  The measured microseconds live in the ``matmulnbits_levels``
section of the ORT latency table (``lowbit/mixed/tables/ort-cpu.json``), written by :func:`measure`::

    python -m lowbit.backends.ort_levels --write      # re-measure on this machine

A level is *slow* when it takes more than ``SLOW_FACTOR`` × the fastest level for the same bits (a
reference kernel, not a slower fast kernel).  ``lower-nbits`` asks :func:`choose_level`:

* ``auto``: exact float activations (level 0) where they are not slow, else the fastest level;
* ``fastest``: the fastest measured level;
* an integer: that level (the pass warns or refuses, naming the layer, when it is slow).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["SLOW_FACTOR", "level_table", "choose_level", "is_slow", "measure", "TABLE"]

logger = logging.getLogger(__name__)

SLOW_FACTOR = 20.0
TABLE = Path(__file__).resolve().parents[1] / "compiler" / "mixed" / "tables" / "ort-cpu.json"
LEVELS = (0, 4)


def _table_path() -> Path:
    try:  # the installed package's copy
        from lowbit.mixed.latency import TABLE_DIR

        return Path(TABLE_DIR) / "ort-cpu.json"
    except ImportError:  # pragma: no cover
        return TABLE


@lru_cache(maxsize=1)
def level_table() -> dict[int, dict[int, float]]:
    """{bits: {accuracy_level: µs}} from the table (µs summed over its measured shapes)."""
    data = json.loads(_table_path().read_text()).get("matmulnbits_levels")
    if not data:
        return {}
    out: dict[int, dict[int, float]] = {}
    for e in data["entries"]:
        out.setdefault(int(e["bits"]), {}).setdefault(int(e["level"]), 0.0)
        out[int(e["bits"])][int(e["level"])] += float(e["us"])
    return out


def is_slow(bits: int, level: int) -> bool:
    """True when the table measured ``level`` at more than SLOW_FACTOR × the fastest level for ``bits``."""
    row = level_table().get(bits)
    if not row or level not in row:
        return False
    return row[level] > SLOW_FACTOR * min(row.values())


def choose_level(bits: int, mode: int | str) -> int:
    """The accuracy level ``lower-nbits`` writes for a ``bits``-bit layer (see the module docstring)."""
    if isinstance(mode, int):
        return mode
    row = level_table().get(bits, {})
    fastest = min(row, key=row.get) if row else 0
    if mode == "fastest":
        return fastest
    return 0 if not is_slow(bits, 0) else fastest


def _model(k: int, n: int, bits: int, block: int, level: int):
    from onnx import TensorProto, helper

    nb = k // block
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n, nb, block * bits // 8), dtype=np.uint8)
    inits = [helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
             helper.make_tensor("S", TensorProto.FLOAT, [n * nb], np.full(n * nb, 0.01, np.float32))]
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "lin", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def measure(shapes=((2048, 2048), (2048, 5632)), bits=(2, 4, 8), block: int = 32, threads: int = 2,
            repeat: int = 30) -> dict:
    """Median µs of one M=1 MatMulNBits per (shape, bits, level) on ORT's CPU EP."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    entries = []
    a = {"A": np.random.default_rng(1).standard_normal((1, shapes[0][0])).astype(np.float32)}
    for k, n in shapes:
        a = {"A": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
        for b in bits:
            for level in LEVELS:
                sess = ort.InferenceSession(_model(k, n, b, block, level).SerializeToString(), so,
                                            providers=["CPUExecutionProvider"])
                sess.run(None, a)
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    sess.run(None, a)
                    times.append(time.perf_counter() - t0)
                entries.append({"k": k, "n": n, "bits": b, "level": level,
                                "us": round(float(np.median(times)) * 1e6, 1)})
    return {"block": block, "threads": threads, "m": 1, "onnxruntime": ort.__version__, "entries": entries}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="measure MatMulNBits accuracy levels per bit width")
    ap.add_argument("--write", action="store_true", help="store the result in the ORT latency table")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    res = measure(threads=args.threads)
    for e in res["entries"]:
        logger.warning("K=%d N=%d %d-bit level %d: %.1f us", e["k"], e["n"], e["bits"], e["level"], e["us"])
    if args.write:
        path = _table_path()
        data = json.loads(path.read_text())
        data["matmulnbits_levels"] = res
        path.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

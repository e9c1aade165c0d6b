"""Exit 0 means a working file: the written artifact is loaded in the backend it targets and run once.

Before the output is moved into place, ONNX Runtime builds a session from the *written* file (so
external data, IR version and opsets are those a user will load) and runs one calibration sample
(or a synthetic feed when there is none); every float output must be finite.  Anything else is a
:class:`LowbitError` naming the cause, and nothing is moved into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError, NumericalError

__all__ = ["check_artifact", "synthetic_feed"]

logger = logging.getLogger(__name__)

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
       "tensor(bool)": np.bool_}


def _one_line(text) -> str:
    return " ".join(str(text).split())[:400]


def synthetic_feed(sess) -> dict[str, np.ndarray]:
    """Small valid inputs from the session's signature: token ids 0..3, masks of ones, floats N(0, 1).

    A KV-cache graph is fed as generation starts it (a prefill): every ``past*`` cache input empty
    (its symbolic non-batch axes 0), so that the attention mask's total length (past + sequence)
    agrees with the 4 tokens fed.
    """
    rng = np.random.default_rng(0)
    feed = {}
    for inp in sess.get_inputs():
        past = inp.name.startswith("past")
        shape = [d if isinstance(d, int) and d > 0 else
                 (1 if i == 0 else 0 if past else 4 if i == len(inp.shape) - 1 else 1)
                 for i, d in enumerate(inp.shape)]
        dtype = _NP.get(inp.type)
        if dtype is None:
            raise LowbitError(f"input '{inp.name}' has type {inp.type}, which the output check cannot feed")
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in inp.name:
            feed[inp.name] = np.ones(shape, dtype)
        else:
            feed[inp.name] = (np.arange(int(np.prod(shape))) % 4).reshape(shape).astype(dtype)
    return feed


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as first:  # lowbit-domain ops: a device form; ORT runs it with their function bodies
        import onnx_ir as ir

        from lowbit.ir.sessions import to_proto
        from lowbit.ops.registry import DOMAIN, attach_functions

        try:
            model = ir.load(path)
        except Exception:
            raise first from None
        if not any(n.domain == DOMAIN for n in model.graph.all_nodes()):
            raise
        # the device form keeps lowbit ops: run their standard-ONNX lowering (what --lowered writes)
        from lowbit.passmanager.manager import CompileContext, PassManager

        model = PassManager.from_pipeline("lower-lowbit", CompileContext(show_progress=False)).run(model)
        attach_functions(model)
        return ort.InferenceSession(to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def check_artifact(path: str | Path, feeds: list[dict] | None = None) -> dict:
    """Load ``path`` in ONNX Runtime and run one sample; returns what was checked."""
    path = Path(path)
    try:
        sess = _session(path)
    except Exception as exc:
        raise LowbitError(f"the compiled model does not load in ONNX Runtime: {_one_line(exc)}",
                          hint="this recipe cannot produce a working model for this input (dtype, opset or op); "
                               "try another recipe, or report it") from exc
    names = [i.name for i in sess.get_inputs()]
    feed = None
    if feeds:
        first = feeds[0]
        if isinstance(first, dict) and all(n in first for n in names):
            feed = {n: np.asarray(first[n]) for n in names}
    source = "a calibration sample" if feed is not None else "a synthetic input"
    if feed is None:
        feed = synthetic_feed(sess)
    try:
        outs = sess.run(None, feed)
    except Exception as exc:
        raise LowbitError(f"the compiled model fails on {source} in ONNX Runtime: {_one_line(exc)}",
                          hint="try another recipe, or report it") from exc
    for meta, arr in zip(sess.get_outputs(), outs):
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise NumericalError(f"the compiled model's output '{meta.name}' holds {bad} NaN/Inf value(s) on {source}",
                                 hint="a layer overflows or divides by zero at this precision; keep it in float "
                                      "or use a recipe with more bits")
    logger.info("output check: %s runs in ONNX Runtime on %s, outputs finite", path.name, source)
    return {"runtime": "onnxruntime", "input": source, "outputs": len(outs)}

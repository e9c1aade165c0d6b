"""ONNX Runtime sessions over an ``ir.Model`` or a file, with lowbit's defaults.

Plain ``onnxruntime.InferenceSession(path)`` runs every model lowbit writes with the ``ort``
backend; this module only adds the settings lowbit relies on (thread count, keeping
MatMulNBits exact unless asked otherwise) and in-memory sessions for passes and tests.

An ``ir.Model`` whose weights live in external files, or are too large for one protobuf (2 GB),
is written to a temporary folder with its weights in an external data file and ORT opens that
path; smaller in-memory models go to ORT as bytes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from lowbit.errors import LowbitError

__all__ = ["make_session", "run_model", "to_proto", "session_options", "needs_file", "saved_copy"]

IR_VERSION = 10
# Above this many bytes of initializers a model goes to ORT through a file, never as one protobuf.
PROTO_LIMIT = 1 << 30


def needs_file(model: ir.Model) -> bool:
    """True when ``model`` cannot (external tensors) or should not (size) be serialized to bytes."""
    total = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            return True
        total += t.nbytes if t is not None else 0
    return total > PROTO_LIMIT


def to_proto(model: ir.Model):
    """Serialize an ``ir.Model`` to a self-contained ModelProto with the IR version ORT accepts.

    Weights still in external data files (lazily loaded models) are read into the proto, which
    therefore must stay under protobuf's 2 GB limit.
    """
    proto = ir.serde.serialize_model(model)
    proto.ir_version = IR_VERSION
    base_dirs = {str(v.const_value.base_dir) for v in model.graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)}
    if base_dirs:
        from onnx.external_data_helper import load_external_data_for_model

        if len(base_dirs) > 1:
            raise LowbitError(f"external data spread over several folders: {sorted(base_dirs)}")
        load_external_data_for_model(proto, base_dirs.pop())
    return proto


def session_options(threads: int | None = None, optimized_model_path: str | None = None,
                    matmulnbits_accuracy_level: int | None = 0, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_model_path:
        so.optimized_model_filepath = str(optimized_model_path)
        # weights of the optimized model go beside it, so that a model over 2 GB can be written
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    Path(optimized_model_path).name + ".data")
    if matmulnbits_accuracy_level is not None:
        # ORT rewrites DQ(blocked int4)->MatMul into MatMulNBits with accuracy level 4
        # (int8 activations) unless told otherwise; 0 keeps it exact.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(matmulnbits_accuracy_level))
    return so


@contextlib.contextmanager
def saved_copy(model: ir.Model):
    """Yield the path of a temporary copy of ``model`` with its weights in an external data file."""
    with tempfile.TemporaryDirectory(prefix="lowbit-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        model.ir_version = IR_VERSION
        ir.save(model, path, external_data="model.onnx.data")
        yield path


def make_session(model: ir.Model | str | os.PathLike | Any, **kwargs):
    """An ORT CPU session over an ``ir.Model``, a ModelProto or a path."""

    so = session_options(**kwargs)
    if isinstance(model, ir.Model) and needs_file(model):
        # ORT reads the weights while it builds the session; the folder may go away afterwards.
        with saved_copy(model) as path:
            return _open(str(path), so)
    if isinstance(model, ir.Model):
        payload = to_proto(model).SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        payload = str(Path(model))
    else:
        model.ir_version = min(model.ir_version, IR_VERSION) or IR_VERSION
        payload = model.SerializeToString()
    return _open(payload, so)


def _open(payload, so):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(payload, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise LowbitError(f"ONNX Runtime cannot load the model: {exc}",
                          hint="run 'lowbit inspect MODEL' to see its ops and opsets") from exc


def run_model(model, feeds: Mapping[str, np.ndarray], outputs=None, **kwargs) -> list[np.ndarray]:
    return make_session(model, **kwargs).run(outputs, dict(feeds))

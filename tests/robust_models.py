"""Small real models for the robustness tests: a tiny random Llama and one-MatMul graphs.

Random weights are fine here: these tests check what lowbit accepts and refuses, never quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
from lowbit.ir.model_io import save_onnx

__all__ = ["TINY", "tiny_llama", "tiny_weights", "token_feeds", "matmul_model", "save_proto", "dir_listing"]

TINY = LlamaConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in random_llama_weights(TINY, seed).items()}


def tiny_llama(path: Path, weights: dict[str, np.ndarray] | None = None, *, external_data: bool = False) -> Path:
    """Write the tiny Llama (opset 23) to ``path`` and return the path."""
    save_onnx(build_llama(TINY, weights if weights is not None else tiny_weights()), path,
              external_data=external_data)
    return path


def token_feeds(n: int = 3, seq: int = 12, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, TINY.vocab_size, (1, seq), dtype=np.int64)} for _ in range(n)]


def save_proto(proto: onnx.ModelProto, path: Path) -> Path:
    proto.ir_version = 10
    path.write_bytes(proto.SerializeToString())
    return path


def matmul_model(path: Path, shape=(4, 4), *, opset: int = 21, extra_nodes=(), extra_opsets=(),
                 weight_as_input: bool = False) -> Path:
    """y = x @ w.weight (w: ``shape``), then ``extra_nodes`` (each reads 'h' or the previous output)."""
    k, n = shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), "w.weight")
    nodes = [helper.make_node("MatMul", ["x", "w.weight"], ["h"], name="w")]
    last = "h"
    for i, (op, domain) in enumerate(extra_nodes):
        nodes.append(helper.make_node(op, [last], [f"e{i}"], name=f"extra{i}", domain=domain))
        last = f"e{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    inputs = [x] + ([helper.make_tensor_value_info("w.weight", TensorProto.FLOAT, list(shape))] if weight_as_input else [])
    graph = helper.make_graph(nodes, "g", inputs, [y], [] if weight_as_input else [w])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return save_proto(helper.make_model(graph, opset_imports=opsets), path)


def dir_listing(folder: Path) -> list[str]:
    """Every name under ``folder`` (hidden temp files included); [] if it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []

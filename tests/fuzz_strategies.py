"""Structure-aware fuzzing (hypothesis strategies) for issue 17: random-but-valid small graphs with a recipe
and calibration, plans (valid ones and single-field mutations), calibration folders, pass-option strings and
CLI option lists.  Used by ``tests/test_fuzz_structured.py`` (bounded, CI) and ``benchmarks/fuzz.py``
(``--target structured-*``, longer).

Each ``check_*`` runs one input and returns "accepted" or "refused"; anything else raises: an exception
that is not a ``LowbitError`` (or an ``InternalError``) is a crash, a written file that ORT does not run or
whose outputs are far from the float model's is a wrong result, and leftovers at the output are partial.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

__all__ = ["graphs", "plans", "calibration_sets", "pass_option_strings", "cli_option_lists", "check_graph",
           "check_plan", "check_calibration", "check_pass_options", "check_cli_options", "TOLERANCE"]

DIMS = [4, 8, 16, 32]
ACTS = [None, "Relu", "Sigmoid", "Tanh", "Gelu"]
RECIPES = ["w8a8", "w8a8-nosmooth", "w8a8-dynamic", "w8a8-dynamic-nosmooth", "w8a8-dynamic-tensor", "w8a16", "w4a16"]
# relative error to the float model that a compiled tiny graph may show (random weights; 4-bit on K=4 is coarse)
TOLERANCE = {"w4a16": 0.5}


@st.composite
def graphs(draw):
    """(ModelProto, recipe, calibration feeds): a chain of 1-3 linears with optional bias/activation/residual."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    batch = draw(st.sampled_from([1, "b"]))
    k = draw(st.sampled_from(DIMS))
    nodes, inits, last, width = [], [], "x", k
    for i in range(draw(st.integers(1, 3))):
        n, inp = draw(st.sampled_from(DIMS)), last
        scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
        inits.append(numpy_helper.from_array((rng.standard_normal((width, n)) * scale).astype(np.float32), f"l{i}.w"))
        nodes.append(helper.make_node("MatMul", [last, f"l{i}.w"], [f"m{i}"], name=f"l{i}"))
        last = f"m{i}"
        if draw(st.booleans()):
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"l{i}.b"))
            nodes.append(helper.make_node("Add", [last, f"l{i}.b"], [f"a{i}"], name=f"l{i}.bias"))
            last = f"a{i}"
        act = draw(st.sampled_from(ACTS))
        if act:
            nodes.append(helper.make_node(act, [last], [f"h{i}"], name=f"act{i}"))
            last = f"h{i}"
        if n == width and draw(st.booleans()):
            nodes.append(helper.make_node("Add", [last, inp], [f"r{i}"], name=f"res{i}"))
            last = f"r{i}"
        width = n
    g = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
                          [helper.make_tensor_value_info(last, TensorProto.FLOAT, [batch, width])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    rows = 1 if batch == 1 else draw(st.integers(1, 4))
    feeds = [{"x": (rng.standard_normal((rows, k)) * draw(st.sampled_from([0.1, 1.0, 10.0]))).astype(np.float32)}
             for _ in range(draw(st.integers(1, 3)))]
    return model, draw(st.sampled_from(RECIPES)), feeds


def _valid_plan(draw) -> dict:
    layers = []
    for i in range(draw(st.integers(1, 3))):
        k, n = draw(st.sampled_from(DIMS)), draw(st.sampled_from(DIMS))
        bits = draw(st.sampled_from([2, 3, 4, 8, 16]))
        layers.append({"name": f"l{i}", "shape": [k, n], "bits": bits, "group": 0 if bits == 16 else
                       draw(st.sampled_from([0, 16, 32])), "bytes": k * n, "est_error": None, "measured_error": None,
                       "split": None})
    return {"version": 1, "budget": "avg_bits", "target": 4.0, "estimator": "cheap", "fixed_bytes": 0, "model": "",
            "extra": {}, "layers": layers}


ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                       st.lists(st.integers(-3, 40), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                   max_size=2))


@st.composite
def plans(draw):
    """A valid plan, or one with 1-3 fields dropped / replaced by values of any type."""
    plan = _valid_plan(draw)
    for _ in range(draw(st.integers(0, 3))):
        layers = [lp for lp in plan.get("layers", []) if isinstance(lp, dict)] \
            if isinstance(plan.get("layers"), list) else []
        target = plan if not layers or draw(st.booleans()) else draw(st.sampled_from(layers))
        key = draw(st.sampled_from(sorted(target) + ["bogus"]))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(ODD_VALUES)
    return plan


@st.composite
def calibration_sets(draw):
    """Feed lists for the tiny Llama (input 'tokens', vocab 64): names, dtypes, ranks, sizes and values vary."""
    feeds = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["tokens", "tokens", "tokens", "ids"]))
        dtype = draw(st.sampled_from([np.int64, np.int64, np.int64, np.int32, np.float32, np.bool_]))
        shape = (1, draw(st.integers(1, 12))) if draw(st.booleans()) else \
            tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
        hi = draw(st.sampled_from([64, 64, 1000]))
        arr = np.random.default_rng(draw(st.integers(0, 99))).integers(-1 if hi == 1000 else 0, hi, shape)
        feeds.append({name: arr.astype(dtype)})
    return feeds


@st.composite
def pass_option_strings(draw):
    """A pipeline of 1-3 registered passes, each with 0-2 of its own options set to arbitrary values."""
    import dataclasses

    from lowbit.passmanager.manager import get_pass, registered_passes

    names = sorted(registered_passes())
    items = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        fields = [f.name for f in dataclasses.fields(get_pass(name).Options)]
        opts = []
        for key in draw(st.lists(st.sampled_from(fields), max_size=2, unique=True)) if fields else []:
            value = draw(st.one_of(st.integers(-5, 10 ** 6), st.sampled_from(["nan", "inf", "-inf", "1e400", "-0.0",
                                                                               "true", "x", "0.5", "none", "1:2"])))
            opts.append(f"{key}={value}")
        items.append(name + ("{" + ",".join(opts) + "}" if opts else ""))
    return ",".join(items)


OPTION_VALUES = st.sampled_from(["-1", "0", "1", "nan", "inf", "-inf", "abc", "", "10:5", "5:", ":", "1e9", "2.5",
                                 "utf-8", "latin-1", "bogus-enc"])


@st.composite
def cli_option_lists(draw):
    """(command, argv) with random values for the command's numeric/text options."""
    command = draw(st.sampled_from(["compile", "eval", "audit", "export"]))
    options = {"compile": ["--calibration-samples", "--seed", "--encoding"], "export": ["--calibration-samples"],
               "eval": ["--stories", "--seq-len", "--encoding"],
               "audit": ["--samples", "--generate", "--noise-threshold", "--encoding"]}[command]
    argv = []
    for opt in draw(st.lists(st.sampled_from(options), min_size=1, max_size=3, unique=True)):
        argv.append(f"{opt}={draw(OPTION_VALUES)}")
    return command, argv


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-12))


def check_graph(model, recipe: str, feeds, folder: Path) -> str:
    import onnxruntime as ort

    import lowbit
    from lowbit.errors import InternalError, LowbitError

    src = folder / "in.onnx"
    src.write_bytes(model.SerializeToString())
    out = folder / "out" / "m.onnx"
    try:
        lowbit.compile(src, recipe, calibration=feeds, output=out, progress=False)
    except InternalError:
        raise
    except LowbitError:
        left = list(out.parent.iterdir()) if out.parent.exists() else []
        assert left == [], f"partial output {left}"
        return "refused"
    # error over 16 probes inside the calibrated ranges (each calibration sample, and copies shrunk towards 0
    # elementwise: static ranges include 0, so nothing clips), so that one output cancelling to near zero (a
    # Relu of a small difference of large terms) does not stand for the model
    rng = np.random.default_rng(0)
    xs = [f["x"] for f in feeds]
    probes = xs + [(xs[i % len(xs)] * rng.uniform(0, 1, xs[0].shape)).astype(np.float32) for i in range(16 - len(xs))]
    fs = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    qs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = np.stack([fs.run(None, {"x": p})[0].astype(np.float64) for p in probes])
    got = np.stack([qs.run(None, {"x": p})[0] for p in probes])
    assert np.all(np.isfinite(got)), "non-finite output at exit 0"
    # the activations are Lipschitz (≤ 1.13), so a GEMM's rounding error reaches the output at most that
    # much larger; it is measured against the signal scale of the same chain with the activations removed
    # (a saturated Sigmoid has outputs near 0 that say nothing about the size of its inputs' errors)
    linear = model.__class__()
    linear.CopyFrom(model)
    for node in linear.graph.node:
        if node.op_type in ACTS:
            node.op_type = "Identity"
    ls = ort.InferenceSession(linear.SerializeToString(), providers=["CPUExecutionProvider"])
    scale = max(np.linalg.norm(ref), np.linalg.norm(np.stack([ls.run(None, {"x": p})[0] for p in probes])))
    if scale > 1e-3 * math.sqrt(ref.size):
        err = float(np.linalg.norm(got - ref) / scale)
        assert err < TOLERANCE.get(recipe, 0.25), f"wrong result: {recipe} relative error {err:.3f}"
    return "accepted"


def check_plan(plan: dict, folder: Path) -> str:
    from lowbit.errors import InternalError, LowbitError
    from lowbit.mixed.bitplan import Plan

    path = folder / "plan.json"
    path.write_text(json.dumps(plan, allow_nan=True))
    try:
        p = Plan.load(path)
        p.refresh_bytes()
        assert p.avg_bits >= 0 and p.nominal_bits >= 0 and p.total_bytes >= 0
        [lp.describe() for lp in p.layers]
    except InternalError:
        raise
    except LowbitError:
        return "refused"
    return "accepted"


def check_calibration(feeds, model_path: Path, folder: Path) -> str:
    import lowbit
    from lowbit.errors import InternalError, LowbitError

    out = folder / "out" / "m.onnx"
    try:
        lowbit.compile(model_path, "w8a8", calibration=feeds, output=out, progress=False)
    except InternalError:
        raise
    except LowbitError:
        assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])
        return "refused"
    return "accepted"


def check_pass_options(text: str) -> str:
    from lowbit.api.preflight import check_pipeline_paths
    from lowbit.errors import InternalError, LowbitError

    try:
        check_pipeline_paths(text)
    except InternalError:
        raise
    except LowbitError:
        return "refused"
    return "accepted"


def check_cli_options(command: str, argv: list[str], folder: Path) -> str:
    """Options first, then a model that does not exist: every outcome is exit 2 with one error line."""
    import contextlib
    import io

    from lowbit.api.cli import main

    missing = str(folder / "absent.onnx")
    args = {"compile": [command, missing, "-o", str(folder / "o.onnx")],
            "export": [command, missing, "-o", str(folder / "o.onnx"), "--calibration", str(folder)],
            "eval": [command, missing, "--ppl", missing],
            "audit": [command, missing, missing, "--calibration", str(folder)]}[command] + argv
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(args)
        except SystemExit as exc:
            rc = exc.code
    text = err.getvalue()
    lines = [ln for ln in text.splitlines() if "error:" in ln]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in text, (args, rc, text)
    return "refused"

"""Nothing silently wrong, nothing hangs (issue 17): int32 accumulators that can wrap are refused naming the
layer; exit 0 means the written file loads in ONNX Runtime and gives finite outputs; too little calibration
warns; huge calibration text is streamed in bounded memory; FIFOs never block a real process."""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import onnx
import pytest
from bad_input_cases import cli_refuses, cli_refuses_subprocess, nothing_at, text_llama, write_tokenizer
from onnx import TensorProto, helper, numpy_helper
from robust_models import matmul_model, save_proto, tiny_llama, token_feeds

import lowbit
from lowbit.errors import LowbitError, NumericalError

INT32_MAX = 2 ** 31 - 1


def _big_k(tmp, k: int, weights: str = "normal"):
    path = matmul_model(tmp / f"k{k}.onnx", (k, 4))
    if weights == "positive":  # every product the same sign: the accumulator really reaches K·max|a|·max|w|
        proto = onnx.load(str(path))
        proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((k, 4), 0.5, np.float32), "w.weight"))
        save_proto(proto, path)
    rng = np.random.default_rng(1)
    return path, [{"x": np.abs(rng.standard_normal((1, k))).astype(np.float32)} for _ in range(2)]


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-nosmooth", "w8a8-dynamic", "w8a8-dynamic-nosmooth",
                                    "w8a8-dynamic-tensor"])
def test_k_262144_int8_is_refused_naming_the_layer(recipe, tmp_path):
    path, feeds = _big_k(tmp_path, 262_144)
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(NumericalError) as info:
        lowbit.compile(path, recipe, calibration=feeds, output=out, progress=False)
    msg = str(info.value)
    assert "node 'w" in msg and "K=262144" in msg and "int32 accumulator can overflow" in msg
    k, a, w = (int(msg.split(f"{t}=")[1].split(" ")[0].rstrip(",")) for t in ("K", "max|a|", "max|w|"))
    assert k * a * w > INT32_MAX  # the refusal's own numbers prove the bound is exceeded
    nothing_at(out)


def test_k_262144_refused_on_the_cli_too(tmp_path, capsys):
    from bad_input_cases import npz_dir

    path, feeds = _big_k(tmp_path, 262_144, "positive")
    out = tmp_path / "out" / "m.onnx"
    cal = npz_dir(tmp_path / "cal", feeds)
    cli_refuses(["compile", path, "--recipe", "w8a8", "--calibration", cal, "-o", out], capsys,
                ["node 'w'", "int32 accumulator can overflow"], out=out)


def test_what_the_refusal_prevents_is_real_garbage(tmp_path):
    """Numpy, independently: the int32 sum of u8×s8 products at K=262144 with same-sign weights wraps."""
    k = 262_144
    a = np.full(k, 255, np.int64)
    w = np.full(k, 127, np.int64)
    exact = int(a @ w)
    wrapped = int(np.sum((a * w).astype(np.int32), dtype=np.int32))
    assert exact > INT32_MAX and wrapped != exact


@pytest.mark.parametrize("k", [1024, 60_000])
def test_k_within_the_bound_compiles_and_matches_float(k, tmp_path):
    path, feeds = _big_k(tmp_path, k)
    res = lowbit.compile(path, "w8a8-dynamic-nosmooth", calibration=feeds, output=tmp_path / "o.onnx", progress=False)
    assert res.report["int32_accumulators"]["max_bound"] <= INT32_MAX
    import onnxruntime as ort

    w = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]).astype(np.float64)
    ref = feeds[0]["x"].astype(np.float64) @ w  # independent float reference
    got = ort.InferenceSession(str(tmp_path / "o.onnx")).run(None, feeds[0])[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


def _typed_matmul(path, dtype: int, k: int = 64, n: int = 32):
    npd = helper.tensor_dtype_to_np_dtype(dtype)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(npd), "w.weight")
    x = helper.make_tensor_value_info("x", dtype, [1, k])
    y = helper.make_tensor_value_info("y", dtype, [1, n])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w.weight"], ["y"], name="w")], "g", [x], [y], [w])
    return save_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), path)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.DOUBLE], ids=["fp16", "fp64"])
@pytest.mark.parametrize("recipe", ["w8a16", "w4a16", "w8a8-dynamic-nosmooth"])
def test_exit_0_means_a_file_ort_runs(dtype, recipe, tmp_path):
    """Other dtypes: either a clean refusal with nothing written, or a file that ORT loads and runs finitely."""
    import onnxruntime as ort

    path = _typed_matmul(tmp_path / "m.onnx", dtype)
    out = tmp_path / "out" / "m.onnx"
    try:
        lowbit.compile(path, recipe, output=out, progress=False)
    except LowbitError as exc:
        assert "\n" not in exc.message and "Traceback" not in str(exc)
        nothing_at(out)
        return
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(helper.tensor_dtype_to_np_dtype(dtype))
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]).astype(np.float64)
    assert np.all(np.isfinite(got)) and np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2


def _nan_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"], name="root")], "g", [x], [y])
    return save_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), path)


def test_output_check_refuses_non_finite_outputs(tmp_path):
    from lowbit.api.smoke import check_artifact

    with pytest.raises(NumericalError, match="output 'y' holds 4 NaN/Inf value"):
        check_artifact(_nan_model(tmp_path / "nan.onnx"), [{"x": -np.ones((1, 4), np.float32)}])
    assert check_artifact(tmp_path / "nan.onnx", [{"x": np.ones((1, 4), np.float32)}])["outputs"] == 1


def test_output_check_refuses_a_file_ort_cannot_load(tmp_path):
    from lowbit.api.smoke import check_artifact

    proto = onnx.load(str(_nan_model(tmp_path / "m.onnx")))
    proto.graph.node[0].op_type = "Sqrtt"
    with pytest.raises(LowbitError, match="does not load in ONNX Runtime"):
        check_artifact(save_proto(proto, tmp_path / "bad.onnx"))


@pytest.mark.parametrize("tokens", [1, 8])
def test_too_little_calibration_warns(tokens, tmp_path, caplog):
    feeds = [{"tokens": np.arange(tokens, dtype=np.int64).reshape(1, -1)}]
    res = lowbit.compile(tiny_llama(tmp_path / "t.onnx"), "w8a8", calibration=feeds, progress=False)
    assert any("unreliable" in w for w in res.report["warnings"])
    assert "unreliable" in caplog.text


def test_enough_calibration_does_not_warn(tmp_path):
    res = lowbit.compile(tiny_llama(tmp_path / "t.onnx"), "w8a8", calibration=token_feeds(8, seq=16), progress=False)
    assert "warnings" not in res.report


def test_100_mb_without_separators_is_streamed(tmp_path):
    from lowbit.data.datasets import load_calibration

    model, tok = text_llama(tmp_path)
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for _ in range(100):
            f.write("once upon a time " * 61681)  # ≈1 MB a chunk, no separator anywhere
    assert big.stat().st_size > 100e6
    tracemalloc.start()
    start = time.perf_counter()
    feeds = load_calibration(lowbit.load_model(model), big, tokenizer=tok, limit=64, seq_len=256)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(feeds) == 1 and feeds[0]["tokens"].shape == (1, 64)  # cut to the model's 64-token context, not seq_len
    assert peak < 40e6, peak  # the file is 100 MB; whole-file reading held several times that
    assert seconds < 120


def test_streamed_tokens_equal_whole_story_tokens(tmp_path):
    """Cutting a story before tokenizing keeps its first seq_len tokens exactly (independent: encode it all)."""
    from lowbit.data.datasets import load_calibration
    from lowbit.data.tokenizers import Llama2cTokenizer

    model, tok = text_llama(tmp_path)
    story = " ".join(f"word{i % 97} and more text" for i in range(3000))
    (tmp_path / "s.txt").write_text(story + "<|endoftext|>short one")
    feeds = load_calibration(lowbit.load_model(model), tmp_path / "s.txt", tokenizer=tok, seq_len=64)
    full = Llama2cTokenizer(tok).encode(story, bos=True)[:64]
    assert feeds[0]["tokens"][0].tolist() == full and len(feeds) == 2


@pytest.mark.parametrize("what", ["model-bin", pytest.param("tokenizer", marks=pytest.mark.slow),
                                  pytest.param("calibration", marks=pytest.mark.slow)])
def test_fifo_never_blocks_a_real_process(what, tmp_path):
    fifo = tmp_path / ("m.bin" if what == "model-bin" else "f.bin")
    os.mkfifo(fifo)
    model = tiny_llama(tmp_path / "t.onnx")
    tok = write_tokenizer(tmp_path / "tok.bin", 64)
    out = tmp_path / "out" / "m.onnx"
    args = {"model-bin": ["compile", fifo, "-o", out],
            "tokenizer": ["compile", model, "--tokenizer", fifo, "--calibration", tok, "-o", out],
            "calibration": ["compile", model, "--tokenizer", tok, "--calibration", fifo, "-o", out]}[what]
    cli_refuses_subprocess(args, "is a FIFO (named pipe), not a regular file", out=out, timeout=120)


def _biased_fixed_shape(path, layers: int = 3, k: int = 64):
    rng = np.random.default_rng(0)
    nodes, inits, last = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.standard_normal((k, k)).astype(np.float32), f"l{i}.weight"),
                  numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), f"l{i}.bias")]
        nodes += [helper.make_node("MatMul", [last, f"l{i}.weight"], [f"m{i}"], name=f"l{i}"),
                  helper.make_node("Add", [f"m{i}", f"l{i}.bias"], [f"a{i}"], name=f"l{i}.add"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        last = f"r{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, k])], inits)
    return save_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), path)


def test_w8a8_refusal_names_the_layers_and_the_way_out(tmp_path, capsys):
    """Fixed shapes + biases: ORT fuses MatMul+Add into Gemm and runs it in float.  Without the explicit
    integer form the refusal names the layers and suggests w8a8-dynamic, which compiles onto integer kernels."""
    from bad_input_cases import npz_dir

    model = _biased_fixed_shape(tmp_path / "b.onnx")
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)} for i in range(4)]
    out = tmp_path / "out" / "m.onnx"
    cal = npz_dir(tmp_path / "cal", feeds)
    static = "calibrate,quantize{weights=8,acts=8,mode=static},lower-ort{explicit=false}"
    cli_refuses(["compile", model, "--recipe", static, "--calibration", cal, "-o", out], capsys,
                ["node 'l0'", "'l0' runs as Gemm", "--recipe w8a8-dynamic"], out=out)
    res = lowbit.compile(model, "w8a8-dynamic", calibration=feeds, output=out, progress=False)
    assert res.report["lower-ort"]["ort_integer_gemms"] == 3


def test_static_w8a8_on_fixed_shapes_runs_on_integer_kernels(tmp_path):
    """The same model with static w8a8: each linear becomes MatMulInteger → Cast → Mul(s_x·s_w) + b, which ORT
    cannot fuse into a float Gemm.  The output equals a numpy evaluation of the QDQ arithmetic read from the
    compiled file (uint8 activations at the file's scale and zero point, int8 weights), layer by layer."""
    import onnx
    from onnx import numpy_helper as nh

    model = _biased_fixed_shape(tmp_path / "b.onnx")
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)} for i in range(4)]
    out = tmp_path / "out" / "m.onnx"
    res = lowbit.compile(model, "w8a8", calibration=feeds, output=out, progress=False)
    report = res.report["lower-ort"]
    assert report["ort_integer_gemms"] == 3 and report["explicit_integer_linears"] == 3
    proto = onnx.load(str(out))
    init = {t.name: nh.to_array(t) for t in proto.graph.initializer}
    nodes = {n.output[0]: n for n in proto.graph.node}
    by_input = {}
    for n in proto.graph.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)
    ints = [n for n in proto.graph.node if n.op_type == "MatMulInteger"]
    assert len(ints) == 3 and not [n for n in proto.graph.node if n.op_type == "MatMul"]
    x = feeds[0]["x"].astype(np.float64)
    for mm in ints:  # Q(x) → MatMulInteger(x_q, W_q, z) → Cast → Mul(rescale) → Add(bias) → Relu
        q = nodes[mm.input[0]]
        s, z = float(init[q.input[1]]), int(init[q.input[2]])
        xq = np.clip(np.rint(x / s) + z, 0, 255)  # ONNX QuantizeLinear: round half to even, saturate
        acc = (xq - z) @ init[mm.input[1]].astype(np.float64)
        mul = by_input[by_input[mm.output[0]][0].output[0]][0]
        add = by_input[mul.output[0]][0]
        bias = init[add.input[1]] if add.input[1] in init else init[add.input[0]]
        x = np.maximum(acc * init[mul.input[1]].astype(np.float64) + bias, 0)
    from lowbit.ir.sessions import make_session

    got = make_session(str(out)).run(None, feeds[0])[0]
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())

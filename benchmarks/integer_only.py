"""int8-integer-only vs lowbit w8a8 (float rescale) vs ORT quantize_dynamic, on the real models.

Quality: MiniLM STS-test Spearman (all 1379 pairs; calibration: the first 512 distinct sentences of
STS-dev pairs 0–749, nothing tuned on the pairs 750–1499);
stories260K perplexity on EVAL_STORIES (calibration: CALIB_STORIES).  Speed: prefill latency of
one 64-token sequence, as a ratio to FP32, every variant timed round-robin in this one run
(median over rounds).  ``int8-integer-only-tvm`` is the same integer graph compiled by ``lower-tvm``
(int8 GEMMs with the requantize in their epilogue; bit-exact with the reference and ORT), timed for
the static shape 1×64.  Usage: ``python benchmarks/integer_only.py [--rounds 30] [--threads 2]
[--speed-only]`` (``--speed-only``: MiniLM latency ratios only, no quality columns).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import lowbit
from lowbit.data.datasets import CALIB_STORIES, EVAL_STORIES, causal_lm_feeds, data_dir, encoder_feeds, read_stories, read_sts
from lowbit.ir.sessions import make_session, to_proto
from lowbit.passmanager.recipes import RECIPES

VARIANTS = ("fp32", "w8a8", "int8-integer-only", "int8-integer-only-tvm", "ort-dynamic")


def _host_cpu() -> str | None:
    import tvm

    get_cpu = tvm.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
    cpu = get_cpu() if get_cpu is not None else None
    return None if cpu in (None, "generic") else cpu


def build(src, calib, tmp: Path, threads: int, feed: dict, speed_only: bool = False):
    sessions = {}
    fp32 = lowbit.load_model(src)
    path = tmp / "fp32.onnx"
    path.write_bytes(to_proto(fp32).SerializeToString())
    sessions["fp32"] = make_session(str(path), threads=threads)
    for recipe in ("w8a8", "int8-integer-only")[1 if speed_only else 0:]:
        if recipe != "int8-integer-only":
            res = lowbit.compile(src, recipe, calibration=calib, calibration_samples=None, progress=False)
            sessions[recipe] = make_session(res.model, threads=threads)
            continue
        import onnx_ir as ir

        from lowbit.backends.lower_lowbit import LowerLowbit
        from lowbit.backends.tvm_lower import lower_tvm
        from lowbit.ir.integer_check import check_integer_regions
        from lowbit.runtime.tvm_runner import TvmSession

        # the recipe up to its lowering: ORT gets the standard-op bodies, TVM the lowbit ops themselves
        pipeline = RECIPES[recipe].replace(",lower-lowbit,lower-ort", "")
        res = lowbit.compile(src, pipeline, calibration=calib, calibration_samples=None, progress=False)
        lowered = ir.serde.deserialize_model(ir.serde.serialize_model(res.model))
        LowerLowbit()(lowered)
        sessions[recipe] = make_session(lowered, threads=threads)
        target = {"kind": "llvm", "num-cores": threads}
        mcpu = os.environ.get("LOWBIT_TVM_MCPU") or _host_cpu()
        if mcpu:
            target["mcpu"] = mcpu
        art = lower_tvm(res.model, target, tmp / "tvm", "m", shape_dict={k: list(v.shape) for k, v in feed.items()})
        sessions[recipe + "-tvm"] = TvmSession(art.lib)
        sessions["_report"] = res.report
        sessions["_shares"] = check_integer_regions(res.model).summary()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(tmp / "dyn.onnx"), weight_type=QuantType.QInt8)
    sessions["ort-dynamic"] = make_session(str(tmp / "dyn.onnx"), threads=threads)
    return sessions


def latency(sessions, feed, rounds: int) -> dict[str, float]:
    variants = [k for k in VARIANTS if k in sessions]
    times = {k: [] for k in variants}
    for k in variants:
        for _ in range(3):
            sessions[k].run(None, feed)
    for _ in range(rounds):
        for k in variants:
            t = time.perf_counter()
            for _ in range(5):
                sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - t) / 5)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def _same_outputs(sessions, feeds) -> str:
    """How many of ``feeds`` the TVM build answers with exactly the ORT integer graph's outputs."""
    same = 0
    for feed in feeds:
        ort = sessions["int8-integer-only"].run(None, feed)
        tvm = sessions["int8-integer-only-tvm"].run(None, feed)
        same += len(ort) == len(tvm) and all(np.array_equal(a, b) for a, b in zip(ort, tvm))
    return f"{same}/{len(feeds)}"


def _padded(feeds, length: int) -> list[dict]:
    """Real sentences at the TVM build's static length (pad id 0, mask 0; longer ones cut)."""
    return [{k: np.pad(v[:, :length], ((0, 0), (0, max(0, length - v.shape[1])))) for k, v in f.items()} for f in feeds]


def _print(rows, lat) -> None:
    print(f"{'model':<12} {'variant':<22} {'quality':<32} {'prefill64 ms':>12} {'ratio to fp32':>14}")
    for m, k, q, ms, r in rows:
        print(f"{m:<12} {k:<22} {q:<32} {ms:>12.3f} {r:>14.2f}")
    if lat:
        best = "int8-integer-only-tvm" if lat["int8-integer-only-tvm"] < lat["int8-integer-only"] else "int8-integer-only"
        print(f"speed-up over FP32 ORT: {lat['fp32'] / lat[best]:.2f}x ({best}); over ORT quantize_dynamic: "
              f"{lat['ort-dynamic'] / lat[best]:.2f}x; ORT integer graph vs FP32: {lat['fp32'] / lat['int8-integer-only']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-only", action="store_true", help="MiniLM latency ratios only")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # TVM's thread pool, read when TVM loads
    d = data_dir()
    rows, load0 = [], os.getloadavg()  # the box is shared: report how loaded it was
    with tempfile.TemporaryDirectory() as tmp:
        from lowbit.frontends.huggingface import packaged_minilm_path
        from lowbit.runtime.encoder import sts_spearman

        tok_dir = packaged_minilm_path()
        a, b, _ = read_sts(d / "stsbenchmark" / "sts-dev.csv")
        ta, tb, ts = read_sts(d / "stsbenchmark" / "sts-test.csv")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        calib = encoder_feeds(tok_dir, list(dict.fromkeys(a[:750] + b[:750]))[:512], names)
        (Path(tmp) / "m").mkdir()
        feed = {"input_ids": np.full((1, 64), 2023, np.int64), "attention_mask": np.ones((1, 64), np.int64),
                "token_type_ids": np.zeros((1, 64), np.int64)}
        feed["input_ids"][0, 0], feed["input_ids"][0, -1] = 101, 102
        sess = build("minilm", calib[:8] if args.speed_only else calib, Path(tmp) / "m", args.threads, feed,
                     args.speed_only)
        lat = latency(sess, feed, args.rounds)
        exact_m = _same_outputs(sess, [feed, *_padded(encoder_feeds(tok_dir, ta[:16], names, batch=1), 64)])  # + STS-test sentences
        for k in lat:
            if args.speed_only or k.endswith("-tvm"):  # TVM: one static shape; its values = the ORT graph's
                q = "(speed only)" if args.speed_only else "= int8-integer-only (bit-exact)"
            else:
                q = f"STS-test Spearman {sts_spearman(sess[k], tok_dir, ta, tb, ts)[0]:.2f}"
            rows.append(("MiniLM", k, q, lat[k], lat[k] / lat["fp32"]))
        if args.speed_only:
            _print(rows, lat)
            print(f"MiniLM: TVM outputs = ORT integer graph's, bit for bit, on {exact_m} inputs; load average {load0} -> "
                  f"{os.getloadavg()}")
            return
        rep_m, share_m = sess["_report"], sess["_shares"]

        from lowbit.runtime.llm import perplexity, token_stream
        from lowbit.data.tokenizers import Llama2cTokenizer

        src = d / "stories260K" / "stories260K.bin"
        tok = Llama2cTokenizer(d / "stories260K" / "tok512.bin")
        stories = read_stories(d / "tinystories" / "tinystories_hf_validation_head.eot.txt")
        calib = causal_lm_feeds(tok, stories[CALIB_STORIES], 256, "tokens")
        (Path(tmp) / "s").mkdir()
        stream = token_stream(tok, stories[EVAL_STORIES])
        feed = {"tokens": stream[None, :64].astype(np.int64)}
        sess = build(src, calib, Path(tmp) / "s", args.threads, feed)
        lat = latency(sess, feed, args.rounds)
        exact_s = _same_outputs(sess, [feed, *({"tokens": stream[None, i:i + 64].astype(np.int64)}
                                               for i in range(64, 64 * 17, 64))])
        for k in lat:
            if k.endswith("-tvm"):
                q = "= int8-integer-only (bit-exact)"
            else:
                ppl = perplexity(sess[k], stream)
                q = f"ppl {ppl.ppl:.4f} (nll {ppl.nll:.4f})"
            rows.append(("stories260K", k, q, lat[k], lat[k] / lat["fp32"]))
        rep_s, share_s = sess["_report"], sess["_shares"]
    _print(rows, None)
    print(f"TVM outputs = ORT integer graph's, bit for bit, on MiniLM {exact_m} / stories260K {exact_s} inputs; load average "
          f"{load0} -> {os.getloadavg()}")
    for name, rep, share in (("MiniLM", rep_m, share_m), ("stories260K", rep_s, share_s)):
        print(f"{name}: migrate-steps {rep.get('migrate-steps')}; dyadic {rep.get('dyadic')}")
        print(f"{name}: integer op share {share['integer_op_share']:.3f}, integer GEMM MAC share "
              f"{share['integer_mac_share']:.3f}, activation GEMMs {share['activation_gemms']}, "
              f"float ops {share['stays_float_ops']}")


if __name__ == "__main__":
    main()

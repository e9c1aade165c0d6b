"""MiniLM int8-integer-only: STS-test Spearman (all 1379 pairs) and integer share, for a calibration slice.

    nice -n 19 python benchmarks/integer_sts.py --calib-pairs 750-1499      # default: the pairs nothing was tuned on

Calibration: the first ``--sentences`` distinct sentences of STS-dev pairs ``--calib-pairs`` (inclusive),
both sentences of a pair in turn.  ``benchmarks/integer_only.py`` calibrates on pairs 0–749; the recipe's
defaults were chosen on those, so 750–1499 is calibration the recipe was not tuned on.  The integer share
is ``lowbit.ir.integer_check``'s on the graph before lowering (lowbit ops counted as the integer ops they are).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-pairs", default="750-1499")
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--pipeline", default="", help="default: int8-integer-only up to its lowering")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import onnx_ir as ir

    import lowbit
    from lowbit.backends.lower_lowbit import LowerLowbit
    from lowbit.data.datasets import data_dir, encoder_feeds, read_sts
    from lowbit.frontends.huggingface import packaged_minilm_path
    from lowbit.ir.integer_check import check_integer_regions
    from lowbit.ir.sessions import make_session
    from lowbit.passmanager.recipes import RECIPES
    from lowbit.runtime.encoder import sts_spearman

    load0 = os.getloadavg()
    d = data_dir()
    tok_dir = packaged_minilm_path()
    a, b, _ = read_sts(d / "stsbenchmark" / "sts-dev.csv")
    ta, tb, ts = read_sts(d / "stsbenchmark" / "sts-test.csv")
    lo, hi = (int(x) for x in args.calib_pairs.split("-"))
    pairs = [x for p in zip(a[lo:hi + 1], b[lo:hi + 1]) for x in p]
    sentences = list(dict.fromkeys(pairs))[: args.sentences]
    calib = encoder_feeds(tok_dir, sentences, ["input_ids", "attention_mask", "token_type_ids"])
    pipeline = args.pipeline or RECIPES["int8-integer-only"].replace(",lower-lowbit,lower-ort", "")
    fp32 = lowbit.load_model("minilm")
    fp32_sts = sts_spearman(make_session(fp32, threads=args.threads), tok_dir, ta, tb, ts)[0]
    t = time.perf_counter()
    res = lowbit.compile(fp32, pipeline, calibration=calib, calibration_samples=None, progress=False)
    compile_s = time.perf_counter() - t
    share = check_integer_regions(res.model).summary()
    lowered = ir.serde.deserialize_model(ir.serde.serialize_model(res.model))
    LowerLowbit()(lowered)
    got = sts_spearman(make_session(lowered, threads=args.threads), tok_dir, ta, tb, ts)[0]
    print(json.dumps({"calib_pairs": args.calib_pairs, "sentences": len(sentences), "pipeline": pipeline,
                      "fp32_sts": round(fp32_sts, 2), "sts": round(got, 2), "delta": round(got - fp32_sts, 2),
                      "integer_op_share": share["integer_op_share"], "integer_mac_share": share["integer_mac_share"],
                      "compile_s": round(compile_s), "load": [load0, os.getloadavg()]}))


if __name__ == "__main__":
    main()

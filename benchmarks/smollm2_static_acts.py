"""Which activations make static per-tensor int8 lose on SmolLM2-135M: range statistics and ablations on the
FP32 graph with float weights (isolates the activation steps; no smoothing, no lowbit compile).

    nice python benchmarks/smollm2_static_acts.py --out static_acts.json

Every linear input (the MatMuls with a constant weight) gets a QuantizeLinear → DequantizeLinear pair whose
step is ``quantize{mode=static}``'s rule (asymmetric u8 over [min(lo, 0), max(hi, 0)]) on the ranges of
``--calib`` whole stories, each from position 0 as calibration feeds them.  Per activation, on ``--tune``
windows: the relative error ‖QDQ(x) − x‖/‖x‖ of that static step, of per-token symmetric int8 (the
``w8a8-dynamic`` rule) and of an MSE-clipped static range; the largest |x| at a window's first position
and elsewhere.  Variants (perplexity and logits' relative L2 against FP32 on the same windows): every
activation static; every activation per-token; per kind, per-token only there; per kind, static only
there (the rest float).  Slices: ``--calib`` inside the calibration slice 0–99, ``--tune`` inside the
tuning slice 100–399; the reported 600–784 is not touched.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from smollm2_w8a8_static import _slice, act_pairs, mse_clip, qdq_static, qdq_token, variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", default="0-7")
    ap.add_argument("--tune", default="100-131")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="static_acts.json")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    import lowbit
    from lowbit.data.datasets import data_dir, read_stories
    from lowbit.frontends.text_tokenizers import load_tokenizer
    from lowbit.ir.model_io import save_onnx
    from lowbit.runtime.llm import log_softmax, token_stream

    gguf = data_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    stories = read_stories(data_dir() / "tinystories" / "tinystories_hf_validation_head.eot.txt")
    model = lowbit.load_model(gguf)
    tok = load_tokenizer(model.metadata_props.get("lowbit.tokenizer") or gguf)
    fp32 = save_onnx(model, Path(tempfile.mkdtemp(prefix="static_acts_")) / "fp32.onnx")
    del model
    proto = onnx.load(str(fp32))
    inits = {t.name for t in proto.graph.initializer}
    kinds: dict[str, str] = {}
    for n in proto.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and n.input[0] not in inits:
            kinds.setdefault(n.input[0], re.sub(r"\d+", "N", n.name))
    names = list(kinds)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.log_severity_level = 3

    def session(p):
        return ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])

    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in names)
    sess = session(exposed)
    del exposed
    feed = sess.get_inputs()[0].name
    cal: dict[str, list[np.ndarray]] = {x: [] for x in names}
    for story in stories[_slice(args.calib)]:
        ids = np.array(tok.encode(story, bos=True), np.int64)[None]
        for x, a in zip(names, sess.run(names, {feed: ids})):
            cal[x].append(a[0])
    stream = token_stream(tok, stories[_slice(args.tune)])
    wins = np.stack([stream[i * args.seq: i * args.seq + args.seq + 1] for i in range(args.windows)])
    step_zp, acts = {}, []
    per = {x: dict(s=0.0, t=0.0, c=0.0, d=0.0, a0=0.0, ar=0.0) for x in names}
    clip = {}
    for x in names:
        lo, hi = min(float(a.min()) for a in cal[x]), max(float(a.max()) for a in cal[x])
        a, b = min(lo, 0.0), max(hi, 0.0)
        step = (b - a) / 255.0 or 1.0
        step_zp[x] = (step, int(np.clip(np.round(-a / step), 0, 255)), lo, hi)
        clip[x] = mse_clip(cal.pop(x), lo, hi)
    for w in wins:
        for x, a in zip(names, sess.run(names, {feed: w[None, :-1]})):
            a, s = a[0], per[x]
            step, zp = step_zp[x][:2]
            s["d"] += float(np.sum(a.astype(np.float64) ** 2))
            s["s"] += float(np.sum((qdq_static(a, step, zp) - a) ** 2))
            s["t"] += float(np.sum((qdq_token(a) - a) ** 2))
            s["c"] += float(np.sum((qdq_static(a, *clip[x][:2]) - a) ** 2))
            rows = np.abs(a).max(axis=-1)
            s["a0"], s["ar"] = max(s["a0"], float(rows[0])), max(s["ar"], float(rows[1:].max()))
    del sess
    for x in names:
        s = per[x]
        acts.append({"x": x, "kind": kinds[x], "calib_lo": step_zp[x][2], "calib_hi": step_zp[x][3],
                     "absmax_first_position": s["a0"], "absmax_elsewhere": s["ar"],
                     "err_static": (s["s"] / s["d"]) ** 0.5, "err_token": (s["t"] / s["d"]) ** 0.5,
                     "err_mse_clip": (s["c"] / s["d"]) ** 0.5, "clip_ratio": clip[x][2]})

    # the static QDQ graph (float weights)
    nodes, extra = [], []
    for n in proto.graph.node:
        if n.op_type == "MatMul" and n.input[0] in kinds and n.input[1] in inits:
            n.input[0] = n.input[0] + ".dq"
        nodes.append(n)
        for o in n.output:
            if o in kinds:
                step, zp = step_zp[o][:2]
                extra += [helper.make_tensor(o + ".s", TensorProto.FLOAT, [], [step]),
                          helper.make_tensor(o + ".z", TensorProto.UINT8, [], [zp])]
                nodes += [helper.make_node("QuantizeLinear", [o, o + ".s", o + ".z"], [o + ".q"], name=o + ".act_q"),
                          helper.make_node("DequantizeLinear", [o + ".q", o + ".s", o + ".z"], [o + ".dq"],
                                           name=o + ".act_dq")]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(extra)
    pairs = act_pairs(proto)

    def logits(s):
        return [s.run(["logits"], {s.get_inputs()[0].name: w[None, :-1]})[0][0] for w in wins]

    ref = logits(ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"]))
    shutil.rmtree(fp32.parent, ignore_errors=True)  # the graph lives on in ``proto``

    def score(out):
        nll = -np.mean([np.take_along_axis(log_softmax(o), w[1:, None], axis=-1).mean() for o, w in zip(out, wins)])
        num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for o, r in zip(out, ref))
        den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
        return {"ppl": round(float(np.exp(nll)), 4), "rel_l2": round((num / den) ** 0.5, 4)}

    result = {"calib": args.calib, "tune": args.tune, "windows": args.windows, "seq": args.seq,
              "variants": {"fp32": score(ref)}, "activations": acts}

    def run(label, mode):
        t = time.perf_counter()
        result["variants"][label] = score(logits(session(variant(proto, pairs, mode))))
        print(label, result["variants"][label], f"{time.perf_counter() - t:.0f} s", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")

    run("static all", {})
    run("per-token all", {x: "token" for x in names})
    for k in sorted(set(kinds.values())):
        run(f"per-token only {k}", {x: "token" for x in names if kinds[x] == k})
        run(f"static only {k} (rest float)", {x: ("static" if kinds[x] == k else "float") for x in names})


if __name__ == "__main__":
    main()

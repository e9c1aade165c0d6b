"""Why static W8A8 loses on SmolLM2-135M: per-activation range statistics and ablations of the activation steps.

    nice python benchmarks/smollm2_w8a8_static.py --model /tmp/w8a8.onnx --out w8a8_static.json

``--model`` is a ``w8a8`` file (compiled by this script when the path does not exist). Its activation
quantizers (one ``QuantizeLinear → DequantizeLinear`` pair per activation, one per-tensor step) are found
in the graph and, per variant, kept, bypassed (float activations, the int8 weights stay), replaced by
per-token symmetric int8 (``t = max|x_row|/127``, the ``w8a8-dynamic`` rule, emulated in float ops), or
given a clipped per-tensor range (the step that minimises ‖QDQ(x) − x‖² on calibration windows).
Each variant is scored against the FP32 graph (lowbit's GGUF frontend) on tuning windows: NLL/ppl and
logits' relative L2.  Slices: calibration of the MSE clip = stories ``--calib`` (0–31, the ones the
``w8a8`` row calibrated on); analysis = stories ``--tune`` (inside the tuning slice 100–399, never the
reported 600–784).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("smollm2_w8a8_static")


def _slice(text: str) -> slice:
    a, b = text.split("-")
    return slice(int(a), int(b) + 1)


def act_pairs(proto) -> list[dict]:
    """Activation quantizers: QuantizeLinear (scalar step, non-constant input) followed by DequantizeLinear."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pairs = []
    for n in proto.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.input[1] not in inits:
            continue
        step = numpy_helper.to_array(inits[n.input[1]])
        if step.size != 1:
            continue
        zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else np.uint8(0)
        dqs = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        if len(dqs) != 1:
            continue
        users = [c.name for c in consumers.get(dqs[0].output[0], [])]
        pairs.append({"x": n.input[0], "q": n.name, "dq": dqs[0].name, "out": dqs[0].output[0],
                      "step": float(step), "zp": int(zp), "users": users})
    return pairs


def kind_of(users: list[str]) -> str:
    """The linear kind an activation feeds, from its consumers' names (q/k/v, o, gate/up, down, head)."""
    import re

    name = users[0] if users else "?"
    name = re.sub(r"\d+", "N", name)
    return name.split("/")[-1].split(".weight")[0]


def variant(proto, pairs: list[dict], mode: dict[str, str], clip: dict[str, tuple[float, int]] | None = None,
            expose: list[str] | None = None):
    """A copy of ``proto`` where activation ``x`` (by pair) is 'static' (kept), 'float', 'token' or 'clip'."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    by_dq = {p["dq"]: p for p in pairs}
    new_nodes, extra_inits = [], []
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=13)

    def reduce_max(x: str, y: str):
        if opset < 18:
            return helper.make_node("ReduceMax", [x], [y], axes=[-1], keepdims=1)
        if not any(t.name == "lowbit.axes_last" for t in extra_inits):
            extra_inits.append(helper.make_tensor("lowbit.axes_last", TensorProto.INT64, [1], [-1]))
        return helper.make_node("ReduceMax", [x, "lowbit.axes_last"], [y], keepdims=1)

    for n in g.node:
        p = by_dq.get(n.name)
        how = mode.get(p["x"], "static") if p else None
        if p is None or how == "static":
            new_nodes.append(n)
            continue
        x, out, base = p["x"], p["out"], p["dq"]
        if how == "float":
            new_nodes.append(helper.make_node("Identity", [x], [out], name=base + ".float"))
        elif how == "token":  # per-token symmetric int8, emulated: round(x / t) * t, t = max|x_row| / 127
            c127 = base + ".c127"
            extra_inits.append(helper.make_tensor(c127, TensorProto.FLOAT, [], [127.0]))
            eps = base + ".eps"
            extra_inits.append(helper.make_tensor(eps, TensorProto.FLOAT, [], [1e-12]))
            new_nodes += [helper.make_node("Abs", [x], [base + ".abs"]),
                          reduce_max(base + ".abs", base + ".amax"),
                          helper.make_node("Div", [base + ".amax", c127], [base + ".t0"]),
                          helper.make_node("Max", [base + ".t0", eps], [base + ".t"]),
                          helper.make_node("Div", [x, base + ".t"], [base + ".xs"]),
                          helper.make_node("Round", [base + ".xs"], [base + ".r"]),
                          helper.make_node("Mul", [base + ".r", base + ".t"], [out])]
        elif how == "clip":
            step, zp = clip[x]
            s, z = base + ".cstep", base + ".czp"
            extra_inits += [helper.make_tensor(s, TensorProto.FLOAT, [], [step]),
                            helper.make_tensor(z, TensorProto.UINT8, [], [zp])]
            new_nodes += [helper.make_node("QuantizeLinear", [x, s, z], [base + ".cq"]),
                          helper.make_node("DequantizeLinear", [base + ".cq", s, z], [out])]
        else:
            raise ValueError(how)
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(extra_inits)
    if expose:
        for name in expose:
            g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


def qdq_static(x: np.ndarray, step: float, zp: int) -> np.ndarray:
    return (np.clip(np.round(x / step) + zp, 0, 255) - zp) * step


def qdq_token(x: np.ndarray) -> np.ndarray:
    t = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / 127.0, 1e-12)
    return np.round(x / t) * t


def mse_clip(xs: list[np.ndarray], lo: float, hi: float, ratios=np.linspace(0.05, 1.0, 20)) -> tuple[float, int, float]:
    """Per-tensor asymmetric u8 range [r·lo, r·hi] minimising the squared QDQ error on ``xs``; (step, zp, r)."""
    best = None
    for r in ratios:
        a, b = min(r * lo, 0.0), max(r * hi, 0.0)
        step = (b - a) / 255.0 or 1.0
        zp = int(np.clip(np.round(-a / step), 0, 255))
        err = sum(float(np.sum((qdq_static(x, step, zp) - x) ** 2)) for x in xs)
        if best is None or err < best[0]:
            best = (err, step, zp, float(r))
    return best[1], best[2], best[3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="w8a8 .onnx (compiled here from the GGUF if it does not exist)")
    ap.add_argument("--calib", default="0-31")
    ap.add_argument("--tune", default="100-131")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="w8a8_static.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import onnx
    import onnxruntime as ort

    import lowbit
    from lowbit.data.datasets import data_dir, read_stories
    from lowbit.frontends.text_tokenizers import load_tokenizer
    from lowbit.ir.model_io import save_onnx
    from lowbit.runtime.llm import log_softmax, token_stream

    gguf = data_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    stories = read_stories(data_dir() / "tinystories" / "tinystories_hf_validation_head.eot.txt")
    tmp = Path(tempfile.mkdtemp(prefix="w8a8s_"))
    model_path = Path(args.model)
    if not model_path.exists():
        calib_file = tmp / "calib.txt"
        calib_file.write_text("<|endoftext|>".join(stories[_slice(args.calib)]), encoding="utf-8")
        t = time.perf_counter()
        res = lowbit.compile(gguf, "w8a8", calibration=str(calib_file), output=model_path,
                             calibration_samples=None, progress=False)
        logger.info("compiled w8a8 in %.0f s; passes %s", time.perf_counter() - t,
                    [(n, round(sec, 1)) for n, sec, _ in res.timing.rows] if res.timing else "?")
    model = lowbit.load_model(gguf)
    tok = load_tokenizer(model.metadata_props.get("lowbit.tokenizer") or gguf)
    fp32 = save_onnx(model, tmp / "fp32.onnx")
    del model

    def windows_of(sl: str, n: int) -> np.ndarray:
        s = token_stream(tok, stories[_slice(sl)])
        n = min(n, (len(s) - 1) // args.seq)
        return np.stack([s[i * args.seq: i * args.seq + args.seq + 1] for i in range(n)])

    tune = windows_of(args.tune, args.windows)
    calw = windows_of(args.calib, 4)

    def session(m):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = args.threads
        src = m if isinstance(m, (str, Path)) else m.SerializeToString()
        return ort.InferenceSession(str(src) if isinstance(src, Path) else src, so, providers=["CPUExecutionProvider"])

    def run_logits(sess, wins):
        return [sess.run(["logits"], {sess.get_inputs()[0].name: w[None, :-1]})[0][0] for w in wins]

    ref = run_logits(session(fp32), tune)
    shutil.rmtree(tmp, ignore_errors=True)  # the FP32 file is only needed for the reference logits

    def score(sess, out=None) -> dict:
        out = run_logits(sess, tune) if out is None else out
        nll = -np.mean([np.take_along_axis(log_softmax(o), w[1:, None], axis=-1).mean() for o, w in zip(out, tune)])
        num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for o, r in zip(out, ref))
        den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
        return {"ppl": round(float(np.exp(nll)), 4), "rel_l2": round(float(np.sqrt(num / den)), 4)}

    proto = onnx.load(str(model_path))
    pairs = act_pairs(proto)
    logger.info("%d activation quantizers", len(pairs))
    result = {"model": str(model_path), "calib": args.calib, "tune": args.tune, "seq": args.seq,
              "windows": len(tune), "activations": [], "variants": {}}
    result["variants"]["fp32"] = score(None, ref)

    # per-activation statistics with every activation float (smoothed graph, int8 weights)
    names = [p["x"] for p in pairs]
    allfloat = {n: "float" for n in names}
    sess = session(variant(proto, pairs, allfloat, expose=names))
    cal_x: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for w in calw:
        for n, x in zip(names, sess.run(names, {sess.get_inputs()[0].name: w[None, :-1]})):
            cal_x[n].append(x[0])
    clip = {}
    for p in pairs:
        xs = cal_x.pop(p["x"])
        lo = min(float(x.min()) for x in xs)
        hi = max(float(x.max()) for x in xs)
        step, zp, r = mse_clip(xs, lo, hi)
        clip[p["x"]] = (step, zp)
        p["clip_ratio"] = r
    del cal_x
    per = {p["x"]: {"num_s": 0.0, "num_t": 0.0, "num_c": 0.0, "den": 0.0, "amax": 0.0, "amax_pos0": 0.0,
                    "amax_rest": 0.0, "row_max_med": []} for p in pairs}
    for w in tune:
        for p, x in zip(pairs, sess.run(names, {sess.get_inputs()[0].name: w[None, :-1]})):
            x = x[0].astype(np.float32)
            s = per[p["x"]]
            s["den"] += float(np.sum(x.astype(np.float64) ** 2))
            s["num_s"] += float(np.sum((qdq_static(x, p["step"], p["zp"]) - x) ** 2))
            s["num_t"] += float(np.sum((qdq_token(x) - x) ** 2))
            cs, cz = clip[p["x"]]
            s["num_c"] += float(np.sum((qdq_static(x, cs, cz) - x) ** 2))
            rows = np.abs(x).max(axis=-1)
            s["amax"] = max(s["amax"], float(rows.max()))
            s["amax_pos0"] = max(s["amax_pos0"], float(rows[0]))
            s["amax_rest"] = max(s["amax_rest"], float(rows[1:].max()))
            s["row_max_med"].append(float(np.median(rows)))
    del sess
    for p in pairs:
        s = per[p["x"]]
        result["activations"].append({
            "x": p["x"], "kind": kind_of(p["users"]), "users": p["users"], "step": p["step"], "zp": p["zp"],
            "calib_range": round(p["step"] * 255, 3), "tune_absmax": round(s["amax"], 3),
            "tune_absmax_excl_pos0": round(s["amax_rest"], 3), "absmax_at_pos0": round(s["amax_pos0"], 3),
            "median_row_absmax": round(float(np.median(s["row_max_med"])), 4),
            "err_static": round(float(np.sqrt(s["num_s"] / s["den"])), 5),
            "err_token": round(float(np.sqrt(s["num_t"] / s["den"])), 5),
            "err_mse_clip": round(float(np.sqrt(s["num_c"] / s["den"])), 5), "clip_ratio": p["clip_ratio"]})
    acts = result["activations"]

    def run(name: str, mode: dict, use_clip: bool = False) -> None:
        t = time.perf_counter()
        result["variants"][name] = score(session(variant(proto, pairs, mode, clip if use_clip else None)))
        logger.info("%s %s (%.0f s)", name, result["variants"][name], time.perf_counter() - t)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")

    run("static (w8a8 as compiled)", {})
    run("float acts (int8 weights, smoothed)", allfloat)
    run("per-token acts everywhere", {n: "token" for n in names})
    run("mse-clipped static everywhere", {n: "clip" for n in names}, use_clip=True)
    for kind in sorted({a["kind"] for a in acts}):
        run(f"per-token only for {kind}", {a["x"]: "token" for a in acts if a["kind"] == kind})
    worst = sorted(acts, key=lambda a: -a["err_static"])
    for k in (8, 16):
        run(f"per-token for the {k} worst", {a["x"]: "token" for a in worst[:k]})
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()

"""Decode ms/token at several contexts and prefill ms, TinyLlama-1.1B shape (random weights: speed only).

    python benchmarks/decode.py [--layers 22] [--threads 16,2:16/256] [--contexts 16,256,1024] [--prefill 256]
                                [--steps 8] [--genai fp32,int4] [--llama-gguf-dir DIR --llama-bin DIR] [--profile]
                                [--work DIR [--prepare-only]]

One run measures, through the KV cache (lowbit's KVSession: cache kept in ORT between steps):

* lowbit FP32 and lowbit's 8-bit (int8 weights, dynamic int8 activations: ``MatMulInteger``) and 4-bit
  (int4 RTN g128, int8 activations: ``MatMulNBits`` accuracy level 4) graphs, each with a float cache and
  with a quantized cache (``quantize-kv``: int8, or int4 + Hadamard);
* with ``--genai fp32,int4``: onnxruntime-genai's own model builder output for the same random
  weights (a Hugging Face folder written with transformers), timed through its ``Generator``;
* with ``--llama-bin``: llama.cpp's ``llama-bench`` (Q8_0 / Q4_0 GGUFs of the same shape, same threads).

Decode at context c = prefill c tokens, then time ``--steps`` single-token steps (median).  Ratios are to
lowbit FP32 at the same context.  The last table splits lowbit's decode time (ORT's profiler, per node)
into the linear layers and the attention/cache nodes: only the latter grow with the context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = [
    ("lowbit fp32", None),
    ("lowbit fp32 +kv8", "quantize-kv{bits=8,k_mode=token}"),
    ("lowbit w8a8", "quantize{weights=8,acts=8,mode=dynamic},lower-ort"),
    ("lowbit w8a8 +kv8", "quantize-kv{bits=8,k_mode=token}", "lowbit w8a8"),
    ("lowbit w4a8", "quantize-weights{bits=4,group=128,method=rtn},lower-nbits{accuracy_level=4}"),
    ("lowbit w4a8 +kv4", "quantize-kv{bits=4,k_mode=token,group=16,hadamard=true}", "lowbit w4a8"),
]
CLOCK = time.perf_counter  # --cpu-time: time.process_time (all threads' CPU time; ORT spinning off)
_LINEAR_OPS = {"MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear"}


def tinyllama(layers: int):
    from lowbit.frontends.llama2c import LlamaConfig

    return LlamaConfig(dim=2048, hidden_dim=5632, n_layers=layers, n_heads=32, n_kv_heads=4, vocab_size=32000,
                       seq_len=2048)


def time_session(kv, ids, contexts, prefill: int, steps: int) -> dict:
    out = {}
    t = []
    for _ in range(2):
        kv.reset()
        t0 = CLOCK()
        kv.step(ids[:prefill])
        t.append((CLOCK() - t0) * 1e3)
    out["prefill"] = min(t)
    for c in contexts:
        kv.reset()
        kv.step(ids[:c])
        ts = []
        for i in range(steps):
            t0 = CLOCK()
            kv.step(ids[c + i : c + i + 1])
            ts.append((CLOCK() - t0) * 1e3)
        out[c] = statistics.median(ts)
    return out


def _session(path: Path, threads: int, no_spin: bool):
    import onnxruntime as ort

    from lowbit.ir.sessions import session_options

    so = session_options(threads=threads)
    if no_spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def profile_split(path: Path, ids, contexts, threads: int) -> dict:
    """Per context: ms per decode step in linear-layer nodes vs attention/cache nodes (ORT profiler)."""
    import onnxruntime as ort

    from lowbit.ir.sessions import session_options
    from lowbit.runtime import KVSession

    res = {}
    for c in contexts:
        so = session_options(threads=threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(path.parent / f"prof{c}")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        init = {i.name for i in sess.get_inputs()}
        kv = KVSession(sess)
        kv.step(ids[:c])
        for i in range(4):
            kv.step(ids[c + i : c + i + 1])
        trace = json.loads(Path(sess.end_profiling()).read_text())
        runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
        last_runs = runs[-4:]
        lo = last_runs[0]["ts"]
        lin = att = other = 0.0
        for e in trace:
            if e.get("cat") != "Node" or e["ts"] < lo or not e["name"].endswith("_kernel_time"):
                continue
            name, op = e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "")
            d = e["dur"] / 1e3 / 4
            if op in _LINEAR_OPS or (op in ("MatMul", "Gemm", "FusedMatMul") and ".attn.qk" not in name
                                     and ".attn.pv" not in name):
                lin += d
            elif ".attn." in name or name.startswith("present.") or "mask." in name or "kv." in name:
                att += d
            else:
                other += d
        del init
        res[c] = (lin, att, other)
    return res


def genai_prepare(cfg, weights, work: Path, precisions) -> dict:
    """onnxruntime-genai's model builder outputs for the same weights (``weights()`` gives them), cached in work."""
    hf = work / "hf"
    if not (hf / "config.json").exists():
        import torch
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

        w = weights()
        conf = HFConfig(hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                        vocab_size=cfg.vocab_size, max_position_embeddings=2048, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, torch_dtype="float32")
        with torch.device("meta"):
            m = LlamaForCausalLM(conf)
        m = m.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(torch.from_numpy(_hf_weight(name, w, cfg)))
        m.save_pretrained(hf)
        del m
    if not (hf / "tokenizer.json").exists():  # the builder copies a tokenizer into its output
        _word_tokenizer(cfg.vocab_size).save(str(hf / "tokenizer.json"))
        (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    outs = {}
    for precision in precisions:
        out = work / f"genai-{precision}"
        if not (out / "genai_config.json").exists():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                            "-p", precision, "-e", "cpu", "-c", str(work / "cache")], check=True,
                           stdout=subprocess.DEVNULL)
        outs[precision] = out
    return outs


def genai_rows(outs: dict, ids, contexts, prefill, steps, threads) -> dict:
    """The builder outputs timed through onnxruntime-genai's Generator."""
    import onnxruntime_genai as og

    rows = {}
    for precision, out in outs.items():
        conf = json.loads((out / "genai_config.json").read_text())
        conf["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        (out / "genai_config.json").write_text(json.dumps(conf))
        model = og.Model(str(out))
        r = {}

        def run(n_prompt, n_new):
            perf = CLOCK
            p = og.GeneratorParams(model)
            p.set_search_options(max_length=n_prompt + n_new + 1, do_sample=False)
            g = og.Generator(model, p)
            t0 = perf()
            g.append_tokens(ids[:n_prompt].astype(np.int32))
            pre = (perf() - t0) * 1e3
            ts = []
            for _ in range(n_new):
                t0 = perf()
                g.generate_next_token()
                ts.append((perf() - t0) * 1e3)
            return pre, statistics.median(ts)

        r["prefill"] = min(run(prefill, 1)[0] for _ in range(2))
        for c in contexts:
            r[c] = run(c, steps)[1]
        rows[f"ort-genai builder {precision}"] = r
        del model
    return rows


def _word_tokenizer(n: int):
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))


def _hf_weight(name: str, w: dict, cfg) -> np.ndarray:
    """The llama2.c random weights under a Hugging Face parameter name (same arrays; llama2.c's interleaved
    RoPE layout is not permuted to HF's halves, which changes the function but not the speed)."""
    from lowbit.frontends.llama2c import decoder_weights

    d = decoder_weights(cfg, w)
    key = (name.replace("model.embed_tokens.weight", "embed").replace("lm_head.weight", "embed")
           .replace("model.norm", "final_norm").replace("model.", "").replace("self_attn", "attn")
           .replace("input_layernorm", "attn_norm").replace("post_attention_layernorm", "ffn_norm"))
    return np.ascontiguousarray(d[key], dtype=np.float32)


def prepare_ggufs(bin_dir: Path, gguf_dir: Path, layers: int, types) -> None:
    """Random-weight GGUFs of the same shape (decode_kernels' F16 writer, then llama-quantize)."""
    import decode_kernels

    decode_kernels.LAYERS = layers
    for q in types:
        decode_kernels.prepare_gguf(bin_dir, gguf_dir, q)


def llama_rows(bin_dir: Path, gguf_dir: Path, contexts, prefill, steps, threads, types=("Q8_0", "Q4_0")) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    rows = {}
    for q in types:
        files = sorted(gguf_dir.glob(f"*-{q}.gguf"))
        if not files:
            continue
        r = {}
        for c in contexts:
            out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(files[0]), "-p", "0", "-n", str(steps),
                                  "-d", str(c), "-t", str(threads), "-o", "json", "-r", "2"],
                                 capture_output=True, text=True, check=True, env=env)
            r[c] = 1e3 / json.loads(out.stdout)[0]["avg_ts"]
        out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(files[0]), "-p", str(prefill), "-n", "0",
                              "-t", str(threads), "-o", "json", "-r", "2"], capture_output=True, text=True, check=True,
                             env=env)
        r["prefill"] = prefill * 1e3 / json.loads(out.stdout)[0]["avg_ts"]
        rows[f"llama.cpp {q}"] = r
    return rows


def main() -> None:
    from lowbit.data.datasets import kv_prefill_feed
    from lowbit.frontends.llama2c import build_llama, random_llama_weights
    from lowbit.ir.model_io import load_onnx, save_onnx
    from lowbit.passmanager.manager import CompileContext, PassManager
    from lowbit.runtime import KVSession

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22, help="TinyLlama-1.1B has 22 (fewer: same widths, faster)")
    ap.add_argument("--threads", default="2", help="comma-separated thread counts, each timed on the same models; "
                    "T:C1/C2 times thread count T at contexts C1, C2 only (default --contexts)")
    ap.add_argument("--prepare-only", action="store_true", help="build the lowbit/genai models in --work and stop")
    ap.add_argument("--profile", action="store_true", help="also split lowbit's decode time by node kind")
    ap.add_argument("--contexts", default="16,256,1024")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--variants", default="", help="comma-separated indices into the lowbit rows (default all; none)")
    ap.add_argument("--genai", default="", help="also onnxruntime-genai's model builder at these precisions (fp32,int4)")
    ap.add_argument("--llama-bin", help="folder with llama.cpp's llama-bench")
    ap.add_argument("--llama-gguf-dir", help="folder for the random-weight GGUFs (written there once)")
    ap.add_argument("--llama-types", default="Q8_0,Q4_0")
    ap.add_argument("--work", default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="CPU ms of all threads (process time, ORT spinning off) instead of wall ms: robust on an "
                         "oversubscribed machine; llama.cpp rows stay wall time")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    plan = []  # (threads, contexts)
    for part in str(args.threads).split(","):
        t, _, ctx = part.partition(":")
        plan.append((int(t), [int(c) for c in (ctx.split("/") if ctx else args.contexts.split(","))]))
    all_ctx = sorted({c for _, cs in plan for c in cs})
    work = Path(args.work or tempfile.mkdtemp(prefix="lowbit-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = tinyllama(args.layers)
    cache = {}

    def weights():
        if "w" not in cache:
            cache["w"] = random_llama_weights(cfg, seed=0)
        return cache["w"]

    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, max(all_ctx) + args.steps + args.prefill)
    print(f"{'CPU' if args.cpu_time else 'wall'} ms. TinyLlama-1.1B shape (dim 2048, ffn 5632, 32 heads / 4 KV heads, "
          f"vocab 32000), {args.layers} layers, random weights; threads:contexts {args.threads}; decode = median "
          f"of {args.steps} steps after a prefill of the context", flush=True)
    t0 = time.perf_counter()
    base_path = work / "fp32.onnx"
    chosen = ([] if args.variants == "none" else
              [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS)
    if chosen and not base_path.exists():
        save_onnx(build_llama(cfg, weights(), kv_cache=True), base_path, external_data=True)
    paths = {}
    for label, pipeline, *start in chosen:
        path = base_path
        if pipeline:
            path = work / f"{label.replace(' ', '_').replace('+', '')}.onnx"
            if not path.exists():
                model = load_onnx(paths[start[0]] if start and start[0] in paths else base_path)
                calib = [kv_prefill_feed(model, ids[None, :64])]
                model = PassManager.from_pipeline(pipeline, CompileContext(calibration=calib,
                                                                           show_progress=False)).run(model)
                save_onnx(model, path, external_data=True)
                del model
        paths[label] = path
    genai = genai_prepare(cfg, weights, work, args.genai.split(",")) if args.genai else {}
    cache.clear()
    print(f"  lowbit and genai models ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.prepare_only:
        return
    llama = args.llama_bin and args.llama_gguf_dir
    types = args.llama_types.split(",")
    if llama:
        prepare_ggufs(Path(args.llama_bin), Path(args.llama_gguf_dir), args.layers, types)
    for threads, contexts in plan:
        rows = {}
        for label, path in paths.items():
            kv = KVSession(_session(path, threads, args.cpu_time))
            rows[label] = time_session(kv, ids, contexts, args.prefill, args.steps)
            del kv
            print(f"  {label}, {threads} threads: {rows[label]}", flush=True)
        if genai:
            rows.update(genai_rows(genai, ids, contexts, args.prefill, args.steps, threads))
        if llama:
            rows.update(llama_rows(Path(args.llama_bin), Path(args.llama_gguf_dir), contexts, args.prefill,
                                   args.steps, threads, types))
        first = next(iter(rows))
        base = rows[first]
        head = "".join(f"{'ctx ' + str(c):>17s}" for c in contexts) + f"{'prefill ' + str(args.prefill):>19s}"
        print(f"\n{threads} threads: decode ms/token at each context (ratio: {first} ÷ row), prefill ms")
        print(f"{'':34s}{head}")
        for label, r in rows.items():
            cells = "".join(f"{r[c]:9.2f} ({base[c] / r[c]:4.2f}x)" for c in contexts)
            print(f"{label:34s}{cells}{r['prefill']:10.1f} ({base['prefill'] / r['prefill']:4.2f}x)", flush=True)
        if args.profile:
            print(f"\nwhere lowbit's decode time goes, {threads} threads (ms per step: linear layers / "
                  "attention+cache / rest), ORT profiler:")
            for label, path in paths.items():
                split = profile_split(path, ids, contexts, threads)
                print(f"{label:34s}" + "".join(f"  ctx {c}: {a:6.2f} / {b:6.2f} / {o:5.2f}"
                                                 for c, (a, b, o) in split.items()), flush=True)


if __name__ == "__main__":
    main()

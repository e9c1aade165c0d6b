"""Per-token decode time of a TinyLlama-1.1B-shaped decoder (random weights), lowbit's CPU kernels next
to llama.cpp and ORT's MatMulNBits, with % of the memory floor measured in the same run.

Shape: dim 2048, FFN 5632, 22 layers, 32/4 heads, vocab 32000; batch 1, a KV cache pre-filled with
16 positions.  Rows:

* ``lowbit N-bit``: one decode step per token — every linear (q/k/v fused, gate/up fused, o, down, head)
  runs lowbit's C kernel (``backends/kernels``, weights repacked at compile time, activations int8 per
  group); RMSNorm, RoPE + attention over the cache and SwiGLU run in ``lowbit_decode.c`` (one thread),
  called through ctypes.  ``linears`` is the time of the kernel calls alone (the same calls, no glue).
* ``llama.cpp <type>``: ``llama-bench -p 0 -n <tokens/rounds> -d 16 -r 1`` on a random-weight GGUF written with
  the ``gguf`` package and quantized with ``llama-quantize`` (``--llama-bin``; skipped without it).
* ``ORT MatMulNBits 4-bit``: the same chain of linears as one ONNX graph of MatMulNBits nodes
  (linears only; accuracy levels 0 and 4).

Rows take turns: each of ``--rounds`` rounds runs every row for tokens/rounds tokens, and a row's
ms/token is the median over rounds (min-max printed), so the slow phases of a shared machine fall on
every row alike.  Floor = weight bytes read per token ÷ read bandwidth of a C sum over 1 GiB on the
kernels' threads and work pool (same threads; best of a probe before and one after the rounds).
Random weights: for speed only, never quality.  Example::

    python benchmarks/decode_kernels.py --threads 2 --llama-bin /path/to/llama.cpp/build/bin
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's glue must not spin threads against the kernels'
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

DIM, FFN, HEADS, KV_HEADS, VOCAB, CTX = 2048, 5632, 32, 4, 32000, 16
LAYERS = 22  # --layers changes it (smoke runs)
HD = DIM // HEADS
# lowbit's recipes: w8a16 per channel (group 0), w4a16 groups of 128, w3a16 the grid form (lowbit.MatMulGrid,
# uint8 scales) in groups of 16, w2a16 the grid form in groups of 8; the other rows are formats the passes can
# write with fewer metadata bits (integer 3-bit g128 / 2-bit g32, g128; grid g32 / g64)
FORMATS = ["8:0", "4:128", "grid3:16", "grid2:8", "3:128", "2:32", "2:128", "grid3:64", "grid2:32"]
LLAMA_TYPES = ["Q8_0", "Q4_0", "Q3_K_S", "Q2_K", "TQ2_0"]


def _kernels():
    """lowbit.backends.kernels, or the same files loaded by path where lowbit is not installed."""
    try:
        return importlib.import_module("lowbit.backends.kernels.cpu"), importlib.import_module(
            "lowbit.backends.kernels.layout")
    except ImportError:
        root = Path(__file__).resolve().parents[1] / "backends" / "kernels"
        spec = importlib.util.spec_from_file_location("lowbit_kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["lowbit_kernels"] = mod
        spec.loader.exec_module(mod)
        return importlib.import_module("lowbit_kernels.cpu"), importlib.import_module("lowbit_kernels.layout")


cpu, layout = _kernels()
grid = importlib.import_module(layout.__name__.rsplit(".", 1)[0] + ".grid")


def random_grid(k: int, n: int, bits: int, group: int, rng) -> "grid.GridPacked":
    """A random grid-form linear (lowbit.MatMulGrid, uint8 scales) directly in the grid kernel's layout."""
    gc = max(group, 32)
    nt, nb = -(-n // layout.TILE), -(-k // gc)
    ng = nb * gc // group
    codes = rng.integers(0, 256, (nt, nb, bits, 2 * gc), dtype=np.uint8)
    types = rng.integers(0, 1 << 32, (nt, ng), dtype=np.uint32)
    scales = rng.integers(64, 256, (nt, ng, layout.TILE), dtype=np.uint8)
    step = np.full(nt * layout.TILE, 0.02 / np.sqrt(k) / 128 / 4, np.float32)
    return grid.GridPacked(bits, k, n, group, codes, types, scales, step)


def parse_format(text: str) -> tuple[int, int, bool]:
    """``BITS:GROUP`` (integer groups) or ``gridBITS:GROUP`` (the grid form, uint8 scales) → (bits, group, grid)."""
    is_grid = text.startswith("grid")
    b, g = text[4:].split(":") if is_grid else text.split(":")
    return int(b), int(g), is_grid


def format_name(bits: int, group: int, is_grid: bool) -> str:
    return f"lowbit {bits}-bit {'grid ' if is_grid else ''}g{group or 'K'}"


def random_packed(k: int, n: int, bits: int, group: int, rng) -> "layout.Packed":
    """A random-weight linear directly in the kernels' layout (every byte pattern is a valid code)."""
    gc = 32 if group == 16 and bits <= 3 else group  # 2/3-bit g16: codes in blocks of two groups
    nt, ng = -(-n // layout.TILE), -(-k // gc) * gc // group
    codes = rng.integers(0, 256, (nt, ng * group // gc, bits, 2 * gc), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.5, (nt, ng, layout.TILE)).astype(np.float32) * np.float32(0.02 / np.sqrt(k))
    zeros = rng.integers(0, 1 << bits, (nt, ng, layout.TILE), dtype=np.uint8)
    return layout.Packed(bits, k, n, group, codes, scales, zeros)


class Decoder:
    """The decode step of the module docstring, on lowbit's kernels."""

    def __init__(self, bits: int, group: int, seed: int = 0, is_grid: bool = False):
        rng = np.random.default_rng(seed)
        g2 = lambda k: group if group else -(-k // 32) * 32  # noqa: E731  (0: per channel, one group along K)

        def lin(k, n):
            if is_grid:
                return grid.GridLinear(random_grid(k, n, bits, group, rng))
            return cpu.CpuLinear(random_packed(k, n, bits, g2(k), rng))

        self.layers = []
        for _ in range(LAYERS):
            self.layers.append({name: lin(k, n) for name, k, n in (
                ("qkv", DIM, DIM + 2 * KV_HEADS * HD), ("o", DIM, DIM), ("gu", DIM, 2 * FFN), ("down", FFN, DIM))})
        self.head = lin(DIM, VOCAB)
        self.embed = _embedding()
        self.kc = rng.standard_normal((LAYERS, KV_HEADS, CTX + 512, HD), dtype=np.float32)
        self.vc = rng.standard_normal((LAYERS, KV_HEADS, CTX + 512, HD), dtype=np.float32)
        inv = 1.0 / (10000.0 ** (np.arange(0, HD, 2) / HD))
        ang = np.arange(CTX + 512)[:, None] * inv[None]
        self.cos, self.sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        self.kc_ptr, self.vc_ptr = self.kc.ctypes.data, self.vc.ctypes.data
        self._bufs = {"x": np.zeros((1, DIM), np.float32), "h": np.zeros((1, DIM), np.float32),
                      "att": np.zeros((1, DIM), np.float32), "act": np.zeros((1, FFN), np.float32),
                      "scratch": np.zeros(CTX + 512, np.float32)}
        self.weight_bytes = sum(l_.p.nbytes for layer in self.layers for l_ in layer.values()) + self.head.p.nbytes

    def step(self, token: int, pos: int) -> int:
        """One token: every op is a C call on preallocated buffers (addresses computed once)."""
        lib, f4 = cpu.library(), 4
        b = self._bufs
        np.copyto(b["x"], self.embed[token][None])
        x, h, att, act = (b[k].ctypes.data for k in ("x", "h", "att", "act"))
        cs, sn = self.cos.ctypes.data + pos * (HD // 2) * f4, self.sin.ctypes.data + pos * (HD // 2) * f4
        cap, layer_kv = self.kc.shape[2], KV_HEADS * self.kc.shape[2] * HD * f4
        for i, L in enumerate(self.layers):
            lib.lowbit_rmsnorm(DIM, x, None, 1e-5, h)
            L["qkv"].run_ptr(h)
            lib.lowbit_rope_attend(HEADS, KV_HEADS, HD, pos, cap, L["qkv"].y_ptr, cs, sn, self.kc_ptr + i * layer_kv,
                                   self.vc_ptr + i * layer_kv, att, b["scratch"].ctypes.data)
            L["o"].run_ptr(att)
            lib.lowbit_add(DIM, x, L["o"].y_ptr)
            lib.lowbit_rmsnorm(DIM, x, None, 1e-5, h)
            L["gu"].run_ptr(h)
            lib.lowbit_swiglu(FFN, L["gu"].y_ptr, act)
            L["down"].run_ptr(act)
            lib.lowbit_add(DIM, x, L["down"].y_ptr)
        lib.lowbit_rmsnorm(DIM, x, None, 1e-5, h)
        self.head.run_ptr(h)
        return int(np.argmax(self.head.y))

    def linears_only(self) -> None:
        xs = {DIM: np.ones((1, DIM), np.float32), FFN: np.ones((1, FFN), np.float32)}
        for L in self.layers:
            for lin in L.values():
                lin(xs[lin.p.k])
        self.head(xs[DIM])


_DECODERS: dict[tuple[int, int, bool], Decoder] = {}
_EMBED: list[np.ndarray] = []


def _embedding() -> np.ndarray:
    """One float32 token-embedding table shared by every decoder (one row is read per token)."""
    if not _EMBED:
        _EMBED.append(np.random.default_rng(1).standard_normal((VOCAB, DIM), dtype=np.float32) * np.float32(0.02))
    return _EMBED[0]


class LowbitRow:
    """Decode steps of one lowbit format; the cache is filled (and the code warmed) once."""

    def __init__(self, bits: int, group: int, is_grid: bool = False):
        key = (bits, group, is_grid)
        self.dec = _DECODERS.get(key) or _DECODERS.setdefault(key, Decoder(bits, group, is_grid=is_grid))
        self.tok, self.pos = 1, 0
        for self.pos in range(CTX):  # fill the cache (again: random keys/values past it), warm up
            self.tok = self.dec.step(self.tok, self.pos)
        self.pos = CTX

    def run(self, tokens: int) -> float:
        """ms per token over the next ``tokens`` decode steps (positions keep growing)."""
        t = time.perf_counter()
        for _ in range(tokens):
            self.tok = self.dec.step(self.tok, self.pos)
            self.pos += 1
        return (time.perf_counter() - t) / tokens * 1e3

    def extra(self, tokens: int) -> dict:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(max(tokens // 4, 4)):
                self.dec.linears_only()
            best = min(best, (time.perf_counter() - t) / max(tokens // 4, 4))
        return {"linears_ms": best * 1e3, "bytes": self.dec.weight_bytes}


def _linear_params() -> int:
    return LAYERS * (DIM * (DIM + 2 * KV_HEADS * HD) + DIM * DIM + DIM * 2 * FFN + FFN * DIM) + DIM * VOCAB


# ---------------------------------------------------------------- ORT MatMulNBits (linears only)
class OrtRow:
    """The chain of MatMulNBits linears as one ORT session (built once)."""

    def __init__(self, threads: int, accuracy_level: int, block: int = 128):
        self.sess, self.nbytes = _ort_session(threads, accuracy_level, block)
        self.feed = {"x": np.random.default_rng(1).standard_normal((1, DIM)).astype(np.float32)}
        for _ in range(3):
            self.sess.run(None, self.feed)

    def run(self, tokens: int) -> float:
        t = time.perf_counter()
        for _ in range(tokens):
            self.sess.run(None, self.feed)
        return (time.perf_counter() - t) / tokens * 1e3

    def extra(self, tokens: int) -> dict:
        return {"bytes": self.nbytes}


def _ort_session(threads: int, accuracy_level: int, block: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes, inits, nbytes = [], [], 0
    x = "x"
    shapes = [("q", DIM, DIM), ("k", DIM, KV_HEADS * HD), ("v", DIM, KV_HEADS * HD), ("o", DIM, DIM),
              ("g", DIM, FFN), ("u", DIM, FFN), ("d", FFN, DIM)]
    for i in range(LAYERS):
        outs = {}
        for name, k, n in shapes:
            b = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
            s = rng.uniform(0.001, 0.01, n * (k // block)).astype(np.float32)
            src = {"o": outs.get("q"), "d": outs.get("g")}.get(name, x)
            pfx = f"l{i}{name}"
            inits += [helper.make_tensor(pfx + "B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
                      helper.make_tensor(pfx + "S", TensorProto.FLOAT, s.shape, s.tobytes(), raw=True)]
            nbytes += b.nbytes + s.nbytes
            nodes.append(helper.make_node("MatMulNBits", [src, pfx + "B", pfx + "S"], [pfx], domain="com.microsoft",
                                          K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level))
            outs[name] = pfx
        nodes.append(helper.make_node("Add", [x, outs["d"]], [f"l{i}x"]))
        x = f"l{i}x"
    b = rng.integers(0, 256, (VOCAB, DIM // block, block // 2), dtype=np.uint8)
    s = rng.uniform(0.001, 0.01, VOCAB * (DIM // block)).astype(np.float32)
    inits += [helper.make_tensor("hB", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
              helper.make_tensor("hS", TensorProto.FLOAT, s.shape, s.tobytes(), raw=True)]
    nbytes += b.nbytes + s.nbytes
    nodes.append(helper.make_node("MatMulNBits", [x, "hB", "hS"], ["y"], domain="com.microsoft", K=DIM, N=VOCAB,
                                  bits=4, block_size=block, accuracy_level=accuracy_level))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, DIM])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        from onnx import save_model

        save_model(model, path, save_as_external_data=True, location="m.data")
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess, nbytes


# ---------------------------------------------------------------- llama.cpp
def write_f16_gguf(path: Path) -> None:
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(DIM)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(3, VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    f16 = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)  # noqa: E731
    w.add_tensor("token_embd.weight", f16(VOCAB, DIM))
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(DIM, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(DIM, np.float32))
        for name, n, k in (("attn_q", DIM, DIM), ("attn_k", KV_HEADS * HD, DIM), ("attn_v", KV_HEADS * HD, DIM),
                           ("attn_output", DIM, DIM), ("ffn_gate", FFN, DIM), ("ffn_up", FFN, DIM),
                           ("ffn_down", DIM, FFN)):
            w.add_tensor(p + name + ".weight", f16(n, k))
    w.add_tensor("output_norm.weight", np.ones(DIM, np.float32))
    w.add_tensor("output.weight", f16(VOCAB, DIM))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_weight_bytes(path: Path) -> int:
    import gguf

    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight")


def prepare_gguf(bin_dir: Path, gguf_dir: Path, qtype: str) -> Path:
    """The random-weight F16 GGUF (written once) quantized to ``qtype`` by llama-quantize (once)."""
    gguf_dir.mkdir(parents=True, exist_ok=True)
    f16 = gguf_dir / f"tinyllama{LAYERS}-random-f16.gguf"
    if not f16.is_file():
        write_f16_gguf(f16)
    q = gguf_dir / f"tinyllama{LAYERS}-random-{qtype}.gguf"
    if not q.is_file():
        subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(q), qtype, str(os.cpu_count())],
                       check=True, capture_output=True)
    return q


class LlamaRow:
    """``llama-bench -p 0 -n TOKENS -d 16 -r 1`` on the quantized random-weight GGUF, once per round."""

    def __init__(self, bin_dir: Path, gguf_dir: Path, qtype: str, threads: int):
        self.bin, self.q, self.threads = bin_dir, prepare_gguf(bin_dir, gguf_dir, qtype), threads

    def run(self, tokens: int) -> float:
        out = subprocess.run([str(self.bin / "llama-bench"), "-m", str(self.q), "-p", "0", "-n", str(tokens), "-d",
                              str(CTX), "-t", str(self.threads), "-r", "1", "-o", "json"], check=True,
                             capture_output=True, text=True)
        return 1e3 / float(json.loads(out.stdout)[0]["avg_ts"])

    def extra(self, tokens: int) -> dict:
        return {"bytes": gguf_weight_bytes(self.q)}


def bars(rows: list[dict]) -> list[str]:
    """The issue's targets for one thread count, from its rows (a row that did not run is skipped)."""
    by = {r["row"]: r for r in rows}
    r4, q4 = by.get("lowbit 4-bit g128"), by.get("llama.cpp Q4_0")
    out = ["", "Targets:"]
    if r4 and q4:
        out.append(f"- 4-bit vs llama.cpp Q4_0: {r4['ms'] / q4['ms']:.2f}x the time (<= 1.0)")
    if r4:
        out.append(f"- 4-bit: {r4['floor_ms'] / r4['ms'] * 100:.0f} % of the floor (>= 60 % at 2 threads)")
    for name, r in by.items():
        if not (r4 and name.startswith(("lowbit 3-bit", "lowbit 2-bit"))):
            continue
        target = 0.85 if name.startswith("lowbit 3") else 0.70
        line = f"- {name[7:]}: {r['ms'] / r4['ms']:.2f}x the 4-bit time (<= {target})"
        slower = [k for k, v in by.items() if k.startswith("llama.cpp") and v["bits_per_weight"] >= r["bits_per_weight"]
                  and v["ms"] < r["ms"]]
        out.append(line + ("; slower than " + ", ".join(slower) if slower else
                           "; no llama.cpp type with as many bits/w is faster"))
    r8 = by.get("lowbit 8-bit gK")
    if r8:
        out.append(f"- 8-bit: {r8['floor_ms'] / r8['ms'] * 100:.0f} % of the floor (>= 60 %)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--formats", nargs="*", default=FORMATS,
                    help="lowbit rows as BITS:GROUP (group 0: per channel) or gridBITS:GROUP (lowbit.MatMulGrid, uint8 "
                         "scales); default %(default)s")
    ap.add_argument("--tokens", type=int, default=32, help="timed tokens per row, split over the rounds")
    ap.add_argument("--rounds", type=int, default=4, help="rows take turns this many times (median reported)")
    ap.add_argument("--sequential", action="store_true",
                    help="run each row's rounds before building the next (one model in memory: < 2 GB)")
    ap.add_argument("--llama-bin", type=Path, default=None, help="folder with llama-bench and llama-quantize")
    ap.add_argument("--gguf-dir", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-gguf")
    ap.add_argument("--llama-types", nargs="+", default=LLAMA_TYPES)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--ort-levels", type=int, nargs="+", default=[4, 0], help="MatMulNBits accuracy levels timed")
    ap.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (22; fewer for a smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    globals()["LAYERS"] = args.layers
    rows = []
    if args.llama_bin is not None:  # write the GGUFs first, while no decoder holds memory
        for qt in args.llama_types:
            prepare_gguf(args.llama_bin, args.gguf_dir, qt)
    print(f"lowbit kernels: {cpu.isa()}; TinyLlama-1.1B shape ({args.layers} layers), random weights, context {CTX}, "
          f"batch 1, {args.tokens} tokens")
    for th in args.threads:
        cpu.set_threads(th)
        bw = cpu.stream_read(1 << 30, 5, th)
        makers = [(format_name(b, g, gr), lambda b=b, g=g, gr=gr: LowbitRow(b, g, gr)) for b, g, gr in
                  map(parse_format, args.formats)]
        if args.llama_bin is not None:
            makers += [(f"llama.cpp {qt}", lambda qt=qt: LlamaRow(args.llama_bin, args.gguf_dir, qt, th))
                       for qt in args.llama_types]
        if not args.no_ort:
            makers += [(f"ORT MatMulNBits 4b acc{acc} (lin.)", lambda acc=acc: OrtRow(th, acc)) for acc in args.ort_levels]
        per = max(args.tokens // args.rounds, 1)
        times: dict[str, list[float]] = {name: [] for name, _ in makers}
        extras: dict[str, dict] = {}
        failed: dict[str, str] = {}

        def rounds(runners, n):
            for _ in range(n):
                for name, row in runners:
                    if name in failed:
                        continue
                    try:
                        times[name].append(row.run(per))
                    except (subprocess.CalledProcessError, KeyError, ValueError) as exc:
                        failed[name] = str(exc)
            for name, row in runners:
                if name not in failed:
                    extras[name] = {**row.extra(args.tokens), "ort": isinstance(row, OrtRow)}

        if args.sequential:  # one row's weights in memory at a time
            for name, make in makers:
                rounds([(name, make())], args.rounds)
                _DECODERS.clear()
        else:  # rounds: every row runs tokens/rounds tokens in turn, so a shared machine's slow phases hit all alike
            rounds([(name, make()) for name, make in makers], args.rounds)
            _DECODERS.clear()
        bw = max(bw, cpu.stream_read(1 << 30, 5, th))  # best of the probes before and after the rounds
        print(f"\n## {th} threads: read bandwidth {bw / 1e9:.1f} GB/s (C sum over 1 GiB on the kernels' threads, "
              f"best of before/after); ms/token = median of {args.rounds} rounds of {per} tokens (min-max), "
              + ("rows one after another" if args.sequential else "rows taking turns each round"))
        print(f"| {'row':34} | bits/w | ms/token | min-max | % floor | linears ms | % floor |")
        print("|---|---|---|---|---|---|---|")
        for name, _ in makers:
            if name in failed:
                print(f"| {name}: failed ({failed[name]}) |")
                continue
            r = {"ms": float(np.median(times[name])), "rounds_ms": times[name], **extras[name]}
            if r.pop("ort"):
                r["linears_ms"] = r["ms"]
            floor = r["bytes"] / bw * 1e3
            bpw = r["bytes"] * 8 / _linear_params()
            lin = r.get("linears_ms")
            extra = f"{lin:10.2f} | {floor / lin * 100:6.0f} %" if lin else f"{'—':>10} | {'—':>8}"
            spread = f"{min(times[name]):.0f}-{max(times[name]):.0f}"
            print(f"| {name:34} | {bpw:6.2f} | {r['ms']:8.2f} | {spread:>9} | {floor / r['ms'] * 100:6.0f} % | {extra} |",
                  flush=True)
            rows.append({"threads": th, "row": name, "bandwidth_GBps": bw / 1e9, **r, "bits_per_weight": bpw,
                         "floor_ms": floor})
        for line in bars([r for r in rows if r["threads"] == th]):
            print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

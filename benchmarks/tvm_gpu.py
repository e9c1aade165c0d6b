"""TVM on the GPU: compile here (CUDA sm_90), run on the lent H100 with a runtime-only TVM.

    python benchmarks/tvm_gpu.py build DIR      # here: CUDA libraries, stories260K reference, runtime package
    python DIR/tvm_gpu.py run DIR               # there: see the exact command in the module's __doc__ tail

``build`` writes into DIR: the 4-bit GEMV (``gemv4``: fp16 activations, K x N weight > 200 MB so
that the H100's 50 MB L2 cannot hold it), stories260K and a realistic-shape 4-bit Llama stack
compiled to CUDA (parameters of the stack are generated on the device from their shapes: timing
only), ORT's stories260K logits for the parity check, the runtime-only TVM (the installed package
without libtvm_compiler.so) and this script.  ``run`` measures the device's read bandwidth
(torch sum over 2 GiB), the GEMV's time and its % of the bandwidth floor (bytes it must read ÷
bandwidth), fp16 torch matmul on the same shape, stories260K parity and the stack's latency.

Device command used (PYTHONUNBUFFERED=1, DIR carried):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/apache_tvm_ffi-*.whl &&
    tar xzf DIR/tvm_rt.tgz -C /tmp/site && PYTHONPATH=/tmp/site TVM_USE_RUNTIME_LIB=1 python3 DIR/tvm_gpu.py run DIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

GEMV = dict(K=16384, N=28672, bits=4, block=128)  # 235 MB of 4-bit codes
VARIANTS = [(2, 4, 4), (2, 4, 8), (2, 8, 4), (2, 2, 4), (4, 4, 4), (1, 8, 8), (2, 4, 2), (2, 4, 1)]
Q4 = dict(dim=1024, hidden=2048, layers=2, heads=8, kv_heads=2, vocab=1024)  # parity on the device
STACK = dict(dim=2048, hidden=5632, layers=4, heads=32, kv_heads=4, vocab=8192)


def _gemv_module(K, N, bits, block):
    from lowbit.backends.tvm_kernels import nbits_gemv_module

    return nbits_gemv_module(K, N, bits, block)


def build(out: Path) -> None:
    import onnx_ir as ir
    import tvm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tvm_graphs as tg

    from lowbit.backends.tvm_lower import lower_tvm, make_target
    from lowbit.frontends.llama2c import LlamaConfig, build_llama, load_llama2c, random_llama_weights
    from lowbit.ir.sessions import make_session, to_proto

    out.mkdir(parents=True, exist_ok=True)
    tvm.compile(_gemv_module(**GEMV), target=make_target("cuda")).export_library(str(out / "gemv4.so"))
    (out / "gemv4.json").write_text(json.dumps(GEMV))
    from lowbit.backends.tvm_kernels import nbits_gemv_cuda

    for rows, warps, uk in VARIANTS:  # lowbit's own scheduled GEMV, a few launch shapes
        f = nbits_gemv_cuda(GEMV["K"], GEMV["N"], GEMV["bits"], GEMV["block"], "float16", rows, warps, uk)
        tvm.compile(f, target=make_target("cuda")).export_library(str(out / f"gemv_r{rows}_w{warps}_u{uk}.so"))

    root = Path(__file__).resolve().parents[1]
    data = Path(os.environ.get("LOWBIT_DATA", root / ".." / "shared" / "data"))
    stories = load_llama2c(data / "stories260K" / "stories260K.bin")
    tok = np.random.default_rng(0).integers(0, 512, (1, 32)).astype(np.int64)
    lower_tvm(stories, "cuda", out, "stories", shape_dict={"tokens": [1, 32]})
    np.save(out / "stories_tokens.npy", tok)
    np.save(out / "stories_ort.npy", make_session(stories).run(None, {"tokens": tok})[0])

    c = Q4  # 4-bit Llama whose linears all take lowbit's CUDA GEMV at one token: parity vs ORT
    cfg = LlamaConfig(c["dim"], c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["vocab"], 16)
    q4 = ir.serde.deserialize_model(tg.matmulnbits(to_proto(build_llama(cfg, random_llama_weights(cfg))), 4, 128))
    lower_tvm(q4, "cuda", out, "q4", shape_dict={"tokens": [1, 1]})
    np.save(out / "q4_ort.npy", make_session(q4).run(None, {"tokens": tok[:, :1]})[0])

    c = STACK
    cfg = LlamaConfig(c["dim"], c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["vocab"], 64)
    stack = ir.serde.deserialize_model(tg.matmulnbits(to_proto(build_llama(cfg, random_llama_weights(cfg))), 4, 128))
    for seq in (1, 64):
        art = lower_tvm(stack, "cuda", out, f"stack{seq}", shape_dict={"tokens": [1, seq]})
        with np.load(art.params, allow_pickle=False) as z:  # shapes only: the device draws random values
            spec = [[list(z[f"p{i}"].shape), z[f"p{i}"].dtype.name] for i in range(len(z.files))]
        (out / f"stack{seq}.spec.json").write_text(json.dumps(spec))
        art.params.unlink()

    pkg = Path(tvm.__file__).parent
    with tarfile.open(out / "tvm_rt.tgz", "w:gz") as tf:
        tf.add(pkg, arcname="tvm", filter=lambda ti: None if (
            ti.name.endswith("libtvm_compiler.so") or "/3rdparty" in ti.name or "/src" in ti.name
            or "__pycache__" in ti.name) else ti)
    shutil.copy(__file__, out / "tvm_gpu.py")


# ----------------------------------------------------------------------------- device side
def _runtime():
    import ctypes

    import tvm_ffi  # noqa: F401

    spec = __import__("importlib.util").util.find_spec("tvm")
    lib = Path(spec.origin).parent / "lib" / "libtvm_runtime_cuda.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    import tvm
    from tvm.support import nvcc

    @tvm.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, target=None):  # noqa: ARG001
        return nvcc.compile_cuda(code, target_format="cubin", arch="sm_90", compiler="nvrtc")

    return tvm


def _load(tvm, path, dev):
    import tvm.runtime.vm  # not imported by ``import tvm`` in a runtime-only install

    return tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(path)), dev)


def run(d: Path) -> None:
    import torch

    tvm = _runtime()
    dev = tvm.cuda(0)
    res = {"device": torch.cuda.get_device_name(0)}
    ev = lambda: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))  # noqa: E731

    def cuda_ms(fn, reps=50):
        fn()
        torch.cuda.synchronize()
        a, b = ev()
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / reps

    big = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
    sum_ms = cuda_ms(lambda: big.sum(), 20)
    res["read_bandwidth_GBps"] = big.numel() * 2 / sum_ms / 1e6
    del big

    g = json.loads((d / "gemv4.json").read_text())
    K, N, bits, block = g["K"], g["N"], g["bits"], g["block"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randint(-2**31, 2**31 - 1, (N, K * bits // 32), dtype=torch.int32, device="cuda", generator=gen)
    s = (torch.rand((N, K // block), device="cuda", generator=gen) * 0.01 + 1e-3).half()
    z = torch.randint(0, 16, (N, K // block), device="cuda", generator=gen).half()
    a = torch.randn((1, K), device="cuda", generator=gen).half()
    vm = _load(tvm, d / "gemv4.so", dev)
    w_u32 = tvm.runtime.tensor(w.cpu().numpy().view(np.uint32), dev)
    targs = [tvm.runtime.from_dlpack(a), w_u32, tvm.runtime.from_dlpack(s), tvm.runtime.from_dlpack(z)]
    y = torch.from_dlpack(vm["main"](*targs))
    per = 32 // bits
    q = torch.stack([(w >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], -1).reshape(N, K).half()
    wf = (q - z.repeat_interleave(block, 1)) * s.repeat_interleave(block, 1)  # [N, K]
    ref = (a.float() @ wf.float().T)
    res["gemv_rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
    del q
    wt = wf.T.contiguous()
    del wf
    gemv_ms = cuda_ms(lambda: vm["main"](*targs), 50)
    bytes_read = w.numel() * 4 + 2 * s.numel() * 2 + a.numel() * 2 + N * 2
    res.update(gemv4_ms=gemv_ms, gemv4_bytes=bytes_read,
               gemv4_floor_ms=bytes_read / res["read_bandwidth_GBps"] / 1e6,
               gemv4_pct_floor=100 * bytes_read / res["read_bandwidth_GBps"] / 1e6 / gemv_ms,
               gemv4_GBps=bytes_read / gemv_ms / 1e6)
    y_out = torch.empty((1, N), dtype=torch.float16, device="cuda")
    t_out = tvm.runtime.from_dlpack(y_out)
    for rows, warps, uk in VARIANTS:
        lib = tvm.runtime.load_module(str(d / f"gemv_r{rows}_w{warps}_u{uk}.so"))
        fn = lib["nbits_gemv"]
        fn(*targs, t_out)
        err = float((y_out.float() - ref).abs().max() / ref.abs().max())
        ms = cuda_ms(lambda: fn(*targs, t_out), 50)
        res[f"lowbit_gemv_r{rows}_w{warps}_u{uk}"] = dict(
            ms=ms, pct_floor=100 * bytes_read / res["read_bandwidth_GBps"] / 1e6 / ms, rel_err=err)
    res["fp16_torch_ms"] = cuda_ms(lambda: a @ wt, 50)
    res["speedup_vs_fp16"] = res["fp16_torch_ms"] / gemv_ms
    del wt, w, w_u32

    import numpy as np_

    sv = _load(tvm, d / "stories.so", dev)
    with np_.load(d / "stories.params.npz") as zf:
        params = [tvm.runtime.tensor(zf[f"p{i}"], dev) for i in range(len(zf.files))]
    tok = tvm.runtime.tensor(np_.load(d / "stories_tokens.npy"), dev)
    logits = sv["main"](tok, *params).numpy()
    ort = np_.load(d / "stories_ort.npy")
    res["stories260K_rel_err_vs_ort"] = float(np_.abs(logits - ort).max() / np_.abs(ort).max())

    qv = _load(tvm, d / "q4.so", dev)
    with np_.load(d / "q4.params.npz") as zf:
        params = [tvm.runtime.tensor(zf[f"p{i}"], dev) for i in range(len(zf.files))]
    logits = qv["main"](tvm.runtime.tensor(np_.load(d / "stories_tokens.npy")[:, :1], dev), *params).numpy()
    ort = np_.load(d / "q4_ort.npy")
    res["q4_llama_1tok_rel_err_vs_ort"] = float(np_.abs(logits - ort).max() / np_.abs(ort).max())

    for seq in (1, 64):
        spec = json.loads((d / f"stack{seq}.spec.json").read_text())
        ps = []
        rng = np.random.default_rng(seq)
        for shape, dt in spec:
            if dt.startswith(("uint", "int")):
                ps.append(tvm.runtime.tensor(rng.integers(0, np.iinfo(dt).max, shape, dtype=dt), dev))
            else:
                ps.append(tvm.runtime.from_dlpack((torch.rand(shape, device="cuda") * 0.02).to(getattr(torch, dt))))
        vm = _load(tvm, d / f"stack{seq}.so", dev)
        tk = tvm.runtime.from_dlpack(torch.randint(0, STACK["vocab"], (1, seq), device="cuda"))
        res[f"stack_seq{seq}_ms"] = cuda_ms(lambda: vm["main"](tk, *ps), 20)
        res[f"stack_seq{seq}_weight_MB"] = sum(np.prod(s) * np.dtype(t).itemsize for s, t in spec) / 1e6
    print(json.dumps(res, indent=1))
    out = os.environ.get("OUT")
    if out:
        Path(out, "tvm_gpu_result.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    t0 = time.time()
    build(where) if mode == "build" else run(where)
    print(f"# {mode} took {time.time() - t0:.0f} s", file=sys.stderr)

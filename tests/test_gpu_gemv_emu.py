"""Every GEMV kernel configuration's source (backends/cuda/gemv.cu fp16, q8.cu int8) run on the CPU.

tests/cuda_emu/ compiles the CUDA source with g++ (with AddressSanitizer where the compiler has it, every
buffer an exact-size allocation: a read past K, past a row's scales or zero points, or a store past N fails
the run), on the decode shapes' K (2048, 5632; and 2016, padded, with group 32) and N that leave partial
warps and blocks.  Expected values: float64 numpy on the dequantized weight; bounds as on the GPU
(fp16: 2e-3·Σ|x||Ŵ|; int8: half a quantization step of x per value, see benchmarks/gpu_gemv_q8.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowbit.backends.cuda import gemv, layout, q8

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gpu_step_emu import _cuda_include  # noqa: E402

SHAPES = ((2048, 37, 128), (5632, 29, 128), (2016, 13, 32))


def _table(src: str, macro: str, table: str, sig: str) -> str:
    names = re.findall(rf"{macro}\((\w+),", src)
    body = "\n".join(line for line in src.splitlines() if not line.startswith("#include"))
    rows = ", ".join(f'{{"{n}", {n}}}' for n in names)
    return f"{body}\nstruct {table}_e {{ const char* name; void (*fn){sig}; }};\nstatic const {table}_e {table}[] = {{{rows}}};\n"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    inc = _cuda_include()
    if shutil.which("g++") is None or inc is None:
        pytest.skip("needs g++ and CUDA's headers (cuda_fp16.h; set CUDA_HOME) to run the kernels on the CPU")
    d = tmp_path_factory.mktemp("gemv_emu")
    common = "(const uint4*, const uint2*, const float*, const uint8_t*, "
    (d / "kernels.inc").write_text(
        _table(gemv.wrapper_source(gemv.DEFAULT_CONFIGS), "GEMV_KERNEL", "fp16_kernels",
               common + "const __half*, float*, int, int, int, int, int)")
        + _table(q8.q8_wrapper_source(q8.Q8_CONFIGS), "Q8_GEMV_KERNEL", "q8_kernels",
                 common + "const int4*, const float2*, float*, int, int, int, int, int)"))
    exe = d / "gemv_emu"
    base = ["g++", "-std=c++20", "-O1", f"-I{d}", f"-I{ROOT / 'tests' / 'cuda_emu'}", f"-I{ROOT / 'backends' / 'cuda'}",
            f"-I{inc}", "-o", str(exe), str(ROOT / "tests" / "cuda_emu" / "gemv_emu.cpp"), "-pthread"]
    res = subprocess.run(base + ["-fsanitize=address"], capture_output=True, text=True)
    if res.returncode != 0:
        res = subprocess.run(base, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"the CPU build of the GEMV kernels failed:\n{res.stderr[-3000:]}")
    return exe


def _run(exe, d: Path, kind, name, cfg, w, x16, bits):
    steps = int(w.a.shape[1])
    sps = -(-steps // cfg.split)
    files = {"A": w.a, "H": w.h if w.h is not None else np.zeros(2, np.uint32), "S": w.s, "Z": w.z, "X": x16}
    for k, v in files.items():
        np.ascontiguousarray(v).tofile(d / k)
    out = d / "Y"
    args = [str(exe), name, kind, str(32 * cfg.warps), str(-(-w.n // (cfg.rows * cfg.warps))), str(cfg.split), str(w.n),
            str(w.k_padded), str(w.s.shape[1]), str(w.block), str(sps)] + [str(d / k) for k in "AHSZX"] + [str(out)]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")  # out-of-bounds accesses still fail the run
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, f"{kind} {name}: {res.stderr[-2000:]}"
    return np.fromfile(out, np.float32).astype(np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_every_gemv_configuration_stays_in_bounds_and_matches_numpy_on_cpu(emulator, tmp_path, bits):
    rng = np.random.default_rng(50 + bits)
    for k, n, block in SHAPES:
        g = -(-k // block)
        codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
        s = (rng.random((n, g)) * 0.02 + 1e-3).astype(np.float32)
        z = rng.integers(0, 1 << bits, (n, g)).astype(np.uint8)
        gi = np.arange(k) // block
        wq = (codes - z[:, gi].astype(np.float64)) * s[:, gi]
        for kind, configs, to_layout in (("fp16", gemv.DEFAULT_CONFIGS, layout.to_gpu_layout),
                                         ("q8", q8.Q8_CONFIGS, layout.to_q8_layout)):
            w = to_layout(codes, s, z, bits, block)
            x16 = np.zeros(w.k_padded, np.float16)
            x16[:k] = rng.standard_normal(k)
            x = x16[:k].astype(np.float64)
            ref = wq @ x
            if kind == "fp16":
                tol = 2e-3 * (np.abs(wq) @ np.abs(x))
            else:
                half_step = np.abs(x16.astype(np.float64)).reshape(-1, 32).max(1) / 254.0
                wabs = np.zeros((n, w.k_padded))
                wabs[:, :k] = np.abs(wq)
                tol = (wabs.reshape(n, -1, 32).sum(-1) * half_step).sum(1) + 1e-5 * (np.abs(wq) @ np.abs(x))
            for cfg in configs:
                name = (gemv.kernel_name if kind == "fp16" else q8.q8_kernel_name)(bits, cfg)
                y = _run(emulator, tmp_path, kind, name, cfg, w, x16, bits)
                assert np.all(np.abs(y - ref) <= tol), (kind, cfg, k, n, float(np.max(np.abs(y - ref) / tol)))

"""The fused decode-step kernel's source (backends/cuda/step.cu, q8.cu) run on the CPU against numpy.

No GPU is needed: tests/cuda_emu/ compiles the CUDA source with g++ against a small emulation of the CUDA
built-ins it uses (one process per block, one thread per CUDA thread, real barriers and warp shuffles),
with 64 threads a block and 3 blocks (the grid barrier, the block slices and the attention chunks all
run), on a 2-layer stack (dim 128, FFN 256, 4/2 heads of 64, vocab 64, group 32).  The weights are packed by the same code as on the GPU (``layout.to_q8_layout``,
``DeviceLinear.packed``); the expected logits come from ``benchmarks/gpu_step.py``'s float64 numpy decoder
with the kernel's stated rounding (int8 per 32 activations, fp16 past K/V).  Skips, with the reason,
where g++ or CUDA's headers (cuda_fp16.h) are missing.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lowbit.backends.cuda import layout, step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_step  # noqa: E402


def _cuda_include() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    inc = _cuda_include()
    if shutil.which("g++") is None or inc is None:
        pytest.skip("needs g++ and CUDA's headers (cuda_fp16.h; set CUDA_HOME) to run step.cu on the CPU")
    exe = tmp_path_factory.mktemp("emu") / "step_emu"
    cmd = ["g++", "-std=c++20", "-O1", "-DSTEP_THREADS=64", f"-I{ROOT / 'tests' / 'cuda_emu'}",
           f"-I{ROOT / 'backends' / 'cuda'}", f"-I{inc}", "-o", str(exe), str(ROOT / "tests" / "cuda_emu" / "step_emu.cpp"),
           "-pthread"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"the CPU build of step.cu failed:\n{res.stderr[-3000:]}")
    return exe


class _Blob:
    """Stands in for CuPy: ``asarray`` places an array in one byte blob; ``.data.ptr`` is its offset."""

    def __init__(self):
        self.parts, self.size = [], 0
        self.cuda = SimpleNamespace(Device=lambda: SimpleNamespace(synchronize=lambda: None))

    def asarray(self, a):
        a = np.ascontiguousarray(a)
        off = -(-self.size // 256) * 256
        self.parts.append((off, a.tobytes()))
        self.size = off + a.nbytes
        return SimpleNamespace(shape=a.shape, nbytes=a.nbytes, data=SimpleNamespace(ptr=off))

    def zeros(self, shape, dtype):
        return self.asarray(np.zeros(shape, dtype))

    def bytes(self) -> bytes:
        buf = bytearray(self.size)
        for off, b in self.parts:
            buf[off:off + len(b)] = b
        return bytes(buf)


# smaller than the GPU parity stack: every CUDA thread is an OS thread and every warp shuffle two barriers
EMU_SHAPE = dict(dim=128, hidden=256, layers=2, heads=4, kv_heads=2, vocab=64, max_ctx=48, block=32)


def _emulate(exe, tmp_path, bits, rng, ntok):
    shape = step.StepShape(**EMU_SHAPE)
    blob = _Blob()
    fake_step = SimpleNamespace(DeviceLinear=step.DeviceLinear,
                                DecodeStep=lambda cp, shape, bits, layers, head, nf, emb: (layers, head, nf, emb))
    (layers, head, nf, emb), ref = gpu_step.build(blob, layout, fake_step, shape, bits, rng, host=True)
    table = b""
    for d in layers:
        kc = blob.zeros((shape.kv_heads, shape.max_ctx, 64), np.float16)
        vc = blob.zeros((shape.kv_heads, shape.max_ctx, 64), np.float16)
        table += b"".join(d[n].packed() for n in ("qkv", "o", "gu", "down"))
        table += struct.pack("<QQQQ", d["n1"].data.ptr, d["n2"].data.ptr, kc.data.ptr, vc.data.ptr)
    bufs = [blob.asarray(np.frombuffer(table, np.uint8)), blob.asarray(np.frombuffer(head.packed(), np.uint8)), nf, emb,
            blob.zeros(shape.dim, np.float32), blob.zeros((shape.heads + 2 * shape.kv_heads) * 64, np.float32),
            blob.zeros(shape.hidden, np.float32), blob.zeros(shape.vocab, np.float32), blob.zeros(2, np.uint32),
            blob.zeros(1, np.int32), blob.zeros(1, np.int32)]
    tokens = [int(t) for t in rng.integers(0, shape.vocab, ntok)]
    data = blob.bytes()
    job, out = tmp_path / f"job{bits}", tmp_path / f"out{bits}"
    job.write_bytes(struct.pack("<9i", bits, shape.layers, shape.dim, shape.heads, shape.kv_heads, shape.max_ctx,
                                shape.vocab, 3, ntok) + struct.pack(f"<{ntok}i", *tokens)
                    + struct.pack("<11q", *[b.data.ptr for b in bufs]) + struct.pack("<q", len(data)) + data)
    res = subprocess.run([str(exe), str(job), str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    got = np.fromfile(out, np.float32).astype(np.float64)
    want = gpu_step.reference_logits(shape, ref, tokens, int8_acts=True)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_2bit_step_kernel_source_matches_numpy_decoder_on_cpu(emulator, tmp_path):
    assert _emulate(emulator, tmp_path, 2, np.random.default_rng(32), ntok=2) <= 5e-3


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
def test_step_kernel_source_matches_numpy_decoder_on_cpu(emulator, tmp_path, bits):
    assert _emulate(emulator, tmp_path, bits, np.random.default_rng(30 + bits), ntok=3) <= 5e-3


@pytest.mark.slow
def test_step_kernel_attention_past_one_chunk_on_cpu(emulator, tmp_path):
    assert _emulate(emulator, tmp_path, 3, np.random.default_rng(40), ntok=36) <= 5e-3

"""Run an exported TVM artifact on a device with TVM's runtime only (no compiler, no lowbit, no ONNX).

Standalone on purpose: it imports numpy and ``tvm.runtime`` and nothing of lowbit, so it runs on
an aarch64 board (or under qemu-aarch64) with the runtime-only TVM wheels::

    TVM_USE_RUNTIME_LIB=1 python tvm_device.py model.so feeds.npz outputs.npz

``feeds.npz`` holds ``f<i>.<input name>`` arrays (several feeds of the artifact's static shape);
``outputs.npz`` gets ``f<i>.<output name>``.  ``model.params.npz`` and ``model.json`` (written by
``lowbit export --target``) must lie beside ``model.so``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["run_artifact"]


def run_artifact(lib: str, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    import tvm
    from tvm.runtime import vm

    stem = Path(lib).with_suffix("")
    meta = json.loads(Path(f"{stem}.json").read_text())
    dev = tvm.cpu(0)
    machine = vm.VirtualMachine(tvm.runtime.load_module(str(lib)), dev)
    with np.load(f"{stem}.params.npz", allow_pickle=False) as z:
        params = [tvm.runtime.tensor(z[f"p{i}"], dev) for i in range(meta["num_params"])]
    names = [o["name"] for o in meta["outputs"]]
    results = []
    for feed in feeds:
        args = [tvm.runtime.tensor(np.ascontiguousarray(feed[i["name"]], dtype=i["dtype"]), dev) for i in meta["inputs"]]
        res = machine["main"](*args, *params)
        outs = [res] if hasattr(res, "numpy") else list(res)
        results.append({n: o.numpy() for n, o in zip(names, outs)})
    return results


def main(argv: list[str]) -> int:
    lib, feeds_path, out_path = argv
    with np.load(feeds_path, allow_pickle=False) as z:
        feeds: dict[int, dict[str, np.ndarray]] = {}
        for key in z.files:
            i, _, name = key.partition(".")
            feeds.setdefault(int(i[1:]), {})[name] = z[key]
    t = time.perf_counter()
    results = run_artifact(lib, [feeds[i] for i in sorted(feeds)])
    np.savez(out_path, **{f"f{i}.{k}": v for i, r in enumerate(results) for k, v in r.items()})
    sys.stderr.write(f"tvm_device: {len(results)} feeds in {time.perf_counter() - t:.2f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

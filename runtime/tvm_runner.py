"""Run a TVM artifact written by ``lower_tvm`` with the call shape of an ORT session.

    sess = TvmSession("out/model.so")          # finds model.params.npz and model.json beside it
    logits, = sess.run(None, {"tokens": ids})  # list of numpy arrays, like onnxruntime

The parameters are copied to the device once, at load time.  TVM is imported here, not when
lowbit is imported.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["TvmSession"]

logger = logging.getLogger(__name__)


class _Arg:
    def __init__(self, name: str):
        self.name = name


class TvmSession:
    def __init__(self, lib: str | os.PathLike, device: str | None = None):
        import tvm
        from tvm import relax

        lib = Path(lib)
        stem = lib.with_suffix("")
        meta_path, params_path = stem.with_suffix(".json"), Path(f"{stem}.params.npz")
        for p in (lib, meta_path, params_path):
            if not p.is_file():
                raise LowbitError(f"TVM artifact incomplete: {p} is missing", hint="re-run lower_tvm")
        self.meta = json.loads(meta_path.read_text())
        kind = device or self.meta.get("device", "cpu")
        self.device = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
        if self.meta.get("kernels") == "lowbit-cpu":  # the packed function the module calls
            from lowbit.backends.kernels.tvm_bridge import register

            register()
        self._vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), self.device)
        with np.load(params_path, allow_pickle=False) as z:
            arrays = [z[f"p{i}"] for i in range(self.meta["num_params"])]
        self._params = [tvm.runtime.tensor(a, self.device) for a in arrays]
        self._tensor = tvm.runtime.tensor
        self.input_names = [i["name"] for i in self.meta["inputs"]]
        self.output_names = [o["name"] for o in self.meta["outputs"]]

    def get_inputs(self):
        return [_Arg(n) for n in self.input_names]

    def get_outputs(self):
        return [_Arg(n) for n in self.output_names]

    def run_device(self, feeds: Mapping[str, np.ndarray]):
        """Run and return TVM tensors (no copy back), for timing."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise LowbitError(f"TVM session: missing inputs {missing}", hint=f"inputs are {self.input_names}")
        args = []
        for spec in self.meta["inputs"]:
            x = feeds[spec["name"]]
            if not hasattr(x, "numpy") or isinstance(x, np.ndarray):
                x = self._tensor(np.ascontiguousarray(x, dtype=spec["dtype"]), self.device)
            args.append(x)
        return self._vm["main"](*args, *self._params)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        res = self.run_device(feeds)
        outs = list(res) if not hasattr(res, "numpy") else [res]
        values = dict(zip(self.output_names, (o.numpy() for o in outs)))
        return [values[n] for n in (output_names or self.output_names)]

"""Compile a PyTorch module: export through the dynamo exporter, quantize to W8A8 per token, run in ORT.

    python examples/compile_torch_module.py
"""

from __future__ import annotations

import numpy as np
import torch

import lowbit
from lowbit.ir.sessions import make_session


class Block(torch.nn.Module):
    def __init__(self, d: int = 256):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def main() -> None:
    block = Block().eval()
    x = torch.randn(1, 16, 256)
    model = lowbit.load_model(block, example_inputs=(x,), input_names=["x"], output_names=["y"])
    result = lowbit.compile(model, "w8a8-dynamic-nosmooth", output="out/block.w8a8.onnx")
    y = make_session(result.output).run(None, {"x": x.numpy()})[0]
    ref = block(x).detach().numpy()
    print(f"relative error vs torch: {np.abs(y - ref).max() / np.abs(ref).max():.2e}")
    print(f"integer GEMMs in ORT: {result.report['lower-ort']['ort_integer_gemms']}")


if __name__ == "__main__":
    main()

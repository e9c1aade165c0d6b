"""The file form each planned linear will be written in, and what it costs in the ``.onnx`` file.

``assign-bits`` plans for a quantizer (``quantizer=rtn|gptq``: integer groups, ``MatMulNBits`` /
``lowbit.MatMul3Bit``; ``quantizer=gptq-mod``: at 2 and 3 bits the mixture-of-data-types grid form,
``lowbit.MatMulGrid``, :mod:`lowbit.quant.mod`).  A linear's stored bytes are its initializers
(:func:`lowbit.quant.rtn.storage_bytes` or :func:`lowbit.quant.mod.mod_storage_bytes`); its graph
bytes are the serialized node, tensor headers and, for grid-form scales stored as float16/uint8, the
``Cast`` (and ``Mul`` by the step) that rebuild them; a file with grid-form layers carries
``MatMulGrid``'s function body and one grid table per width once.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.quant.rtn import storage_bytes

__all__ = ["WriteForm", "FORM_BYTES", "MOD_FORM_BYTES"]

FORM_BYTES = 480  # serialized node + tensor headers a quantized linear adds over its float MatMul (MatMulNBits form)
# the same for the grid form by scale storage: float16 and uint8 scales add a Cast (and a Mul by the step) node;
# measured on the test Llama (495, 657 and 954 bytes)
MOD_FORM_BYTES = {"float32": 500, "float16": 660, "uint8": 960}


@dataclass(frozen=True)
class WriteForm:
    quantizer: str = "rtn"  # rtn | gptq | gptq-mod
    scale_dtype: str = "float32"  # gptq-mod: how grid-form scales are stored

    @property
    def probe(self) -> str:
        """The quantizer name the sensitivity probes take (:func:`lowbit.mixed.sensitivity.simulated_array`)."""
        return f"gptq-mod:{self.scale_dtype}" if self.quantizer == "gptq-mod" else self.quantizer

    def grid(self, bits: int) -> bool:
        """Layers at these bits are written as lowbit.MatMulGrid."""
        return self.quantizer == "gptq-mod" and bits in (2, 3)

    def stored_bytes(self, k: int, n: int, bits: int, group: int) -> int:
        if self.grid(bits):
            from lowbit.quant.mod import mod_storage_bytes

            return mod_storage_bytes(k, n, bits, group, scale_dtype=self.scale_dtype)
        return storage_bytes(k, n, bits, group)

    def graph_bytes(self, bits: int) -> int:
        """Graph bytes one quantized linear of this width adds over its float MatMul."""
        return MOD_FORM_BYTES[self.scale_dtype] if self.grid(bits) else FORM_BYTES

    def once_bytes(self, bits) -> int:
        """What a file with grid-form layers of these widths carries once: MatMulGrid's body, the grid tables."""
        from lowbit.ops.registry import get_op
        from lowbit.quant.mod import GRIDS

        widths = [b for b in (2, 3) if b in set(bits) and self.grid(b)]
        if not widths:
            return 0
        return get_op("MatMulGrid").function(25).ByteSize() + sum(GRIDS[b].size * 4 + 40 for b in widths)

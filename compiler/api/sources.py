"""``lowbit.load_model``: the frontends' loader behind the checks at the door and the error boundary."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

__all__ = ["load_model"]


def load_model(source, *, tokenizer: str | Path | None = None, example_inputs=None, **kwargs) -> ir.Model:
    """Load an ``.onnx`` file, a llama2.c ``.bin`` (+ tokenizer), a Hugging Face folder, an ``nn.Module``
    (with ``example_inputs``), an ``ir.Model``, or the name ``minilm``.  Raises only ``LowbitError``s."""
    from lowbit.api.boundary import boundary

    return boundary(_load, source, tokenizer=tokenizer, example_inputs=example_inputs, command="lowbit.load_model",
                    **kwargs)


def _load(source, *, tokenizer, example_inputs, **kwargs) -> ir.Model:
    from lowbit.api.preflight import check_model_source
    from lowbit.frontends import load_model as frontend_load

    check_model_source(source)
    if tokenizer is not None:
        check_model_source(tokenizer, "tokenizer")
    return frontend_load(source, tokenizer=tokenizer, example_inputs=example_inputs, **kwargs)

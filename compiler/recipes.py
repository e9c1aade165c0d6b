"""Named recipes: one place, pipeline strings only."""

from __future__ import annotations

from .errors import PipelineError
from .pipeline import parse_pipeline

__all__ = ["RECIPES", "resolve_recipe"]

RECIPES: dict[str, str] = {
    # smoothing + static per-tensor uint8 activations + per-channel int8 weights
    "w8a8": "calibrate,smooth{alpha=0.5},quantize{weights=8,acts=8,mode=static},lower-ort",
    "w8a8-nosmooth": "calibrate,quantize{weights=8,acts=8,mode=static},lower-ort",
    # per-token dynamic activations (no calibration needed without smoothing)
    "w8a8-dynamic": "calibrate,smooth{alpha=0.5},quantize{weights=8,acts=8,mode=dynamic},lower-ort",
    "w8a8-dynamic-nosmooth": "quantize{weights=8,acts=8,mode=dynamic},lower-ort",
    "w8a16": "quantize{weights=8,acts=16},lower-ort",
    # integer-only linears: static per-channel u8 activations with steps migrated into producers
    # (unit-step quantizers), int8 weights, int32 accumulators, dyadic requantize to the next tensor,
    # 8-bit → 8-bit non-linearities (GELU) as integer lookup tables
    "int8-integer-only": "calibrate{rows=256},migrate-steps,dyadic,integer-lut,lower-lowbit,lower-ort",
}


def resolve_recipe(name_or_pipeline: str) -> str:
    """A recipe name → its pipeline string; anything else is parsed as a pipeline."""
    if name_or_pipeline in RECIPES:
        return RECIPES[name_or_pipeline]
    if "," not in name_or_pipeline and "{" not in name_or_pipeline and name_or_pipeline.count("-") <= 2:
        from .passmanager import registered_passes

        if name_or_pipeline not in registered_passes():
            raise PipelineError(f"unknown recipe '{name_or_pipeline}'",
                                hint=f"recipes: {', '.join(RECIPES)}; or give a pipeline string")
    return str(parse_pipeline(name_or_pipeline))

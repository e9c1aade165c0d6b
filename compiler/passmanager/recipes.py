"""Named recipes: one place, pipeline strings only."""

from __future__ import annotations

from lowbit.errors import PipelineError
from lowbit.passmanager.pipeline import parse_pipeline

__all__ = ["RECIPES", "resolve_recipe"]

RECIPES: dict[str, str] = {
    # smoothing + static per-tensor uint8 activations + per-channel int8 weights
    # (α per group searched on calibration rows: chosen on the tuning slice, +0.30 % against +0.55 % at α=0.5)
    "w8a8": "calibrate{rows=512},smooth{search=true},quantize{weights=8,acts=8,mode=static},lower-ort",
    "w8a8-nosmooth": "calibrate,quantize{weights=8,acts=8,mode=static},lower-ort",
    # per-token dynamic activations (no calibration needed without smoothing)
    "w8a8-dynamic": "calibrate,smooth{alpha=0.5},quantize{weights=8,acts=8,mode=dynamic},lower-ort",
    "w8a8-dynamic-nosmooth": "quantize{weights=8,acts=8,mode=dynamic},lower-ort",
    # per-tensor dynamic activations: the form ORT fuses into DynamicQuantizeMatMul (fastest)
    "w8a8-dynamic-tensor": "quantize{weights=8,acts=8,mode=dynamic-tensor},lower-ort",
    "w8a16": "quantize{weights=8,acts=16},lower-ort",
    # weight-only low-bit (MatMulNBits; lowbit.MatMul3Bit for 3 bits), float activations
    "w4a16": "quantize-weights{bits=4,group=128,method=rtn},lower-nbits",
    # defaults chosen on TinyStories stories 100–399 (benchmarks/quality.py --slice tune), never on the
    # reported 600–784: GPTQ with asymmetric groups and clip search for the linears, the head at 8 bits
    # (per channel), the embedding table as int8 rows
    "w4a16-gptq": "calibrate{hessian=true},"
                  "quantize-weights{bits=4,group=32,method=gptq,symmetric=false,clip_search=true,exclude=lm_head},"
                  "quantize-weights{bits=8,group=0,method=gptq},quantize-embeddings,lower-nbits",
    # 3 and 2 bits: GPTQ with a mixture of data types per group (dtype=mod, lowbit.MatMulGrid) whose grid and
    # scale minimise the diag(XᵀX)-weighted error (hessian_fit), the group scales stored as uint8 codes times a
    # float32 step per column (scale_dtype=uint8: 8 instead of 32 bits per group, ±0.1 point on the tuning
    # slice).  Chosen on TinyStories 100–399 (benchmarks/QUALITY_RESULTS.md):
    # 3-bit: groups of 16, true-sequential GPTQ, not rotated (+19.3 %; not sequential +20.3 %; float32 scales:
    # rotated +22.6 %, unrotated +20.2 %; g32 +32.1 % at 252,523 B; g8 +9.9 % at 277,123 B);
    # 2-bit: groups of 8, true-sequential GPTQ, not rotated, no act order (first 100 tuning stories: +112.0 %;
    # not sequential +120.5 %, act order +135.0 %, rotated +144.9 %; float32 scales +119.6 % at 305,542 B).
    # With uint8 scales a 2-bit g8 linear stores 3.25 bits per weight, a 3-bit g16 one 3.625
    "w3a16": "quantize-weights{bits=3,group=16,method=gptq,symmetric=false,clip_search=true,dtype=mod,hessian_fit=true,"
             "scale_dtype=uint8,sequential=true,exclude=lm_head},"
             "calibrate{hessian=true},quantize-weights{bits=8,group=0,method=gptq},quantize-embeddings,lower-nbits",
    "w2a16": "quantize-weights{bits=2,group=8,method=gptq,symmetric=false,clip_search=true,dtype=mod,hessian_fit=true,"
             "scale_dtype=uint8,sequential=true,exclude=lm_head},"
             "calibrate{hessian=true},quantize-weights{bits=8,group=0,method=gptq},quantize-embeddings,lower-nbits",
    # int4 weights x int8 activations: ORT's MatMulNBits accuracy level 4 quantizes activations to int8
    "w4a8": "fold-norms,rotate,calibrate,smooth{alpha=0.5},calibrate{hessian=true},"
            "quantize-weights{bits=4,group=128,method=gptq},lower-nbits{accuracy_level=4}",
    # int4 weights x static per-tensor int8 activations (QDQ, calibrated): outliers matter, rotation removes them
    "w4a8-static": "fold-norms,rotate,calibrate{hessian=true},quantize-weights{bits=4,group=128,method=gptq},"
                   "quantize-acts{bits=8,static=true},lower-nbits",
    # int4 per-token activations (range clipped at 0.9); ORT has no int4 GEMM, so the int8-activation kernel
    # runs them.  The activation quantizers go in first, so that true-sequential GPTQ sees the int4 inputs
    # each linear will really get; the head keeps float inputs and 8-bit weights
    "w4a4": "fold-norms,rotate,quantize-acts{bits=4,exclude=lm_head,clip=0.9},"
            "quantize-weights{bits=4,group=32,method=gptq,symmetric=false,clip_search=true,exclude=lm_head,"
            "sequential=true},calibrate{hessian=true},quantize-weights{bits=8,group=0,method=gptq},"
            "lower-nbits{accuracy_level=4}",
    # mixed precision at w4a16-gptq's size: each linear (head included) 3, 4 or 8 bits in groups of 32/64/128
    # (or per channel), chosen by the integer program over GPTQ-measured KL sensitivities under 5.66 stored bits
    # per weight (w4a16-gptq stores 5.69 with its 8-bit head), the embedding int8 first.  Held out (stories
    # 600–784): 273,438 B, +4.35 % against w4a16-gptq's 273,957 B, +4.99 %; it replaces mixed-w3.5, which lost
    "mixed-w4a16": "quantize-embeddings,calibrate{hessian=true},"
                   "assign-bits{budget=avg_bits,target=5.66,estimator=measured-kl,bits=3:4:8,groups=32:64:128,"
                   "quantizer=gptq,samples=32},"
                   "quantize-weights{method=gptq,symmetric=false,clip_search=true},lower-nbits",
    # mixed precision at uniform w3a16's size: the same integer program with the grid form as the 2/3-bit candidates
    # (quantizer=gptq-mod: BitMoD grids, Hessian-weighted fit, uint8 scales, groups of 8/16/64) next to 4- and
    # 8-bit integer groups, under a budget of the whole file (258,000 B; w3a16 writes 259,338 B).  Tuning slice
    # (stories 100–399): 256,980 B, +6.6 % against w3a16's +19.3 % (avg_bits budgets: 4.7 → 249,566 B, +8.4 %;
    # 4.1 → 237,168 B, +18.9 %)
    "mixed-w3a16": "quantize-embeddings,calibrate{hessian=true},"
                   "assign-bits{budget=bytes,target=258000,estimator=measured-kl,bits=2:3:4:8,groups=8:16:64,"
                   "quantizer=gptq-mod,scale_dtype=uint8,samples=16},"
                   "quantize-weights{method=gptq,symmetric=false,clip_search=true,dtype=mod,hessian_fit=true,"
                   "scale_dtype=uint8},lower-nbits",
    # integer-only linears: static per-channel u8 activations with steps migrated into producers
    # (unit-step quantizers), int8 weights, int32 accumulators, dyadic requantize to the next tensor,
    # 8-bit → 8-bit non-linearities (GELU) as integer lookup tables, SwiGLU by a silu table and an int32
    # product; attention (Q·Kᵀ, exp-table softmax, P·V) and LayerNorm/RMSNorm over an int16-step residual
    # stream integer too (BERT: float only at the embedding and the output; RoPE attention stays float)
    # (integer-exits: an 8-bit requantized output that only float ops read — Q/K/V of a RoPE attention —
    # is requantized to int16 instead: stories260K held out +1.26 % → +0.38 %)
    # (calibrate{stream=256}: decoders calibrate on 256-token windows cut from the calibration text's token
    # stream, not on stories each starting at BOS — SmolLM2's first 4 layers, tuning stories 100–399:
    # logits rel L2 0.061 → 0.029; stories260K +0.46 % → +0.43 %; encoders keep their sentences)
    "int8-integer-only": "calibrate{rows=256,stream=256},migrate-steps,dyadic,integer-swiglu,integer-lut,"
                         "integer-attention,integer-norms,integer-exits,lower-lowbit,lower-ort",
    # KV-cache graphs (compile --kv-cache): the cache stored at 8 / 4 bits (quantize-kv: K and V per token; the
    # 4-bit caches in groups of 16 channels behind an online Hadamard on K and V — chosen on TinyStories 100-399,
    # benchmarks/KV_RESULTS.md)
    "w8a8-kv8": "calibrate,smooth{alpha=0.5},quantize{weights=8,acts=8,mode=static},quantize-kv{bits=8},lower-ort",
    "w4a8-kv4": "fold-norms,rotate,calibrate,smooth{alpha=0.5},calibrate{hessian=true},"
                "quantize-weights{bits=4,group=128,method=gptq},quantize-kv{bits=4,group=16,hadamard=true},"
                "lower-nbits{accuracy_level=4}",
    "w4a4-kv4": "fold-norms,rotate,calibrate{hessian=true},quantize-weights{bits=4,group=128,method=gptq},"
                "quantize-acts{bits=4,exclude=lm_head},quantize-kv{bits=4,group=16,hadamard=true},"
                "lower-nbits{accuracy_level=4}",
}


def resolve_recipe(name_or_pipeline: str) -> str:
    """A recipe name → its pipeline string; anything else is parsed as a pipeline, in which a recipe
    name without options stands for its passes (``int8-integer-only,lower-tvm{shapes=tokens:1x64}``)."""
    if name_or_pipeline in RECIPES:
        return RECIPES[name_or_pipeline]
    from lowbit.passmanager.manager import registered_passes

    if "," not in name_or_pipeline and "{" not in name_or_pipeline and name_or_pipeline.count("-") <= 2:
        if name_or_pipeline not in registered_passes():
            raise PipelineError(f"unknown recipe '{name_or_pipeline}'",
                                hint=f"recipes: {', '.join(RECIPES)}; or give a pipeline string")
    passes = registered_passes()
    items = [RECIPES[i.name] if i.name in RECIPES and i.name not in passes and not i.options else str(i)
             for i in parse_pipeline(name_or_pipeline)]
    return str(parse_pipeline(",".join(items)))

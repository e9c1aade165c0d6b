"""Hugging Face decoder folders: lowbit's graphs against the transformers model they were saved from.

Tiny random-weight models (transformers' own config classes, every weight perturbed so norms and
biases matter), saved with ``save_pretrained(safe_serialization=True)``.  Two checks per
architecture: the cache-less logits equal transformers' logits, and the KV-cache graph fed token by
token reproduces the cache-less logits.
"""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.ir.sessions import make_session

from test_decoder_kv import decode_stepwise

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              max_position_embeddings=64)
_SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.5)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_SLIDING, query_pre_attn_scalar=12,
                                                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_SLIDING, query_pre_attn_scalar=8, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    # LayerNorm decoders, parallel residuals, fused q/k/v in three layouts, partial rotary (hf_families)
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(use_parallel_residual=True, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "gpt_neox-seq": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(use_parallel_residual=False)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(num_key_value_heads=4, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(multi_query=True, parallel_attn=True, bias=True)),
    "falcon-new": ("FalconConfig", "FalconForCausalLM", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-seq": ("FalconConfig", "FalconForCausalLM", dict(multi_query=False, parallel_attn=False, bias=True)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(use_qkv_bias=True, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
    "stablelm-parallel": ("StableLmConfig", "StableLmForCausalLM", dict(use_parallel_residual=True)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(use_bias=True, sliding_window=4)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96,
                                                  bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                               num_attention_heads=4, word_embed_proj_dim=32, vocab_size=96,
                                               max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                                               eos_token_id=2)),
}


def save_tiny(name: str, folder, seed: int = 0):
    cfg_cls, model_cls, extra = CASES[name]
    kwargs = extra if name in ("gpt2", "opt") else dict(_SMALL, **extra)
    if name.startswith("falcon"):  # head_dim is a derived property there
        kwargs = {k: v for k, v in kwargs.items() if k not in ("head_dim", "num_key_value_heads")}
    config = getattr(transformers, cfg_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = save_tiny(request.param, folder)
    return request.param, folder, model


def test_cacheless_logits_match_transformers(tiny):
    name, folder, model = tiny
    ids = np.random.default_rng(1).integers(3, 96, (2, 11))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    lb = lowbit.load_model(folder)
    assert [v.name for v in lb.graph.inputs] == ["input_ids"]
    got = make_session(lb).run(None, {"input_ids": ids})[0]
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref)), name


def test_kv_decode_reproduces_full_logits(tiny):
    name, folder, _ = tiny
    ids = np.random.default_rng(2).integers(3, 96, (1, 10))
    full = make_session(lowbit.load_model(folder)).run(None, {"input_ids": ids})[0]
    kv = lowbit.load_model(folder, kv_cache=True)
    past = kv.graph.inputs[3]
    heads, head_dim = past.shape[1], past.shape[3]
    n_layers = (len(kv.graph.inputs) - 3) // 2
    got = decode_stepwise(make_session(kv), ids, [3] + [1] * 7, n_layers, heads, head_dim)
    assert np.max(np.abs(got - full)) <= 1e-5 * np.max(np.abs(full)), name


def test_unsupported_rope_scaling_is_refused(tmp_path):
    cfg = transformers.LlamaConfig(**dict(_SMALL, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                    "rope_theta": 10000.0,
                                                                    "original_max_position_embeddings": 16}))
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(LowbitError, match="RoPE scaling 'yarn' is not implemented"):
        lowbit.load_model(tmp_path)


def test_pickle_only_decoder_folder_is_refused(tmp_path):
    save_tiny("qwen2", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(LowbitError, match="no .safetensors"):
        lowbit.load_model(tmp_path)


def test_bf16_checkpoint_builds_a_float32_graph(tmp_path):
    model = save_tiny("qwen3", tmp_path / "f32")
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    # the reference: a fresh float32 model (its RoPE buffers computed in float32) holding the bf16 weights
    fresh = type(model)(model.config).to(torch.float32).eval()
    fresh.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
    ids = np.random.default_rng(3).integers(3, 96, (1, 9))
    with torch.no_grad():
        ref = fresh(input_ids=torch.from_numpy(ids)).logits.numpy()
    lb = lowbit.load_model(tmp_path / "bf16")
    got = make_session(lb).run(None, {"input_ids": ids})[0]
    assert got.dtype == np.float32
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


@pytest.mark.slow  # torch's exporter: ~30 s on 2 cores
@pytest.mark.parametrize("cfg_name,cls_name,extra", [
    ("Olmo2Config", "Olmo2ForCausalLM", {}),
    ("GraniteConfig", "GraniteForCausalLM", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                                 attention_multiplier=0.0625, logits_scaling=8.0))])
def test_undescribed_decoder_is_exported_by_torch(tmp_path, cfg_name, cls_name, extra):
    """A causal LM the builder does not describe: transformers' own graph through torch's exporter (hf_exported)."""
    config = getattr(transformers, cfg_name)(**dict(_SMALL, **extra))
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = np.random.default_rng(1).integers(3, 96, (2, 11))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    lb = lowbit.load_model(tmp_path)
    got = make_session(lb).run(None, {"input_ids": ids})[0]
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
    with pytest.raises(LowbitError, match="KV-cache form is not built for model type"):
        lowbit.load_model(tmp_path, kv_cache=True)


def test_mixture_of_experts_folder_is_refused_naming_the_experts(tmp_path):
    cfg = transformers.MixtralConfig(**dict(_SMALL, num_local_experts=4, num_experts_per_tok=2))
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(LowbitError, match=r"mixture-of-experts decoder \(4 experts\)"):
        lowbit.load_model(tmp_path)

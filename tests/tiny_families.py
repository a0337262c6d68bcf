"""Tiny random models of every causal-LM family transformers lists, built from each default config shrunk.

Used by the coverage test and `scripts/coverage_table.py`. A family that cannot be built this way (it needs
remote code, sub-configs the defaults leave empty, or sizes the generic shrink breaks) is reported, not hidden.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from transformers_sra.models.architectures import decoder_layers, residual_writers
from transformers_sra.testing import randomize_parameters

HIDDEN = 64
VOCAB = 256
MAX_PARAMS = 4_000_000
# Config fields shrunk wherever a family has them (names differ across families).
_SIZES = {
    HIDDEN: ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim", "n_embed", "d_embed"),
    96: ("intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim", "d_ff", "inner_size", "d_inner",
         "ffn_intermediate_size", "mlp_hidden_size", "decoder_ffn_dim", "encoder_ffn_dim", "dense_intermediate_size"),
    48: ("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
         "moe_ffn_hidden_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size"),
    4: ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads", "encoder_attention_heads",
        "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_moe_experts", "mamba_n_heads",
        "linear_num_value_heads", "linear_num_key_heads"),
    2: ("num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num", "num_experts_per_tok",
        "moe_topk", "top_k", "num_experts_per_token", "moe_k", "n_group", "topk_group"),
    16: ("hidden_size_per_layer_input", "global_head_dim", "head_dim", "kv_channels", "qk_rope_head_dim",
         "qk_nope_head_dim", "v_head_dim", "mamba_d_head",
         "mamba_head_dim", "linear_key_head_dim", "linear_value_head_dim", "attention_head_dim", "mamba_d_state",
         "state_size", "d_state", "ssm_state_size"),
    8: ("rotary_dim", "rotary_emb_base_dim"),
    32: ("q_lora_rank", "kv_lora_rank", "time_step_rank", "sliding_window", "attention_window", "local_attention"),
    3: ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_decoder_layers"),
    1: ("first_k_dense_replace", "n_shared_experts", "num_shared_experts", "moe_layer_freq", "decoder_sparse_step"),
    VOCAB: ("vocab_size", "vocab_size_per_layer_input"),
    512: ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"),
}


_GEMMA4 = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, global_head_dim=32, vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, sliding_window=32,
               layer_types=["sliding_attention", "sliding_attention", "full_attention"], hidden_size_per_layer_input=0)
_GEMMA4_MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=48)
_DBRX = dict(d_model=HIDDEN, n_heads=4, n_layers=3, max_seq_len=512, vocab_size=VOCAB,
             # transformers' defaults do not run: attention reads rope_theta from attn_config, clamps with clip_qkv
             attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10_000.0),
             ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2))
_JETMOE = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3, num_key_value_heads=2, kv_channels=16,
               num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB)

# Rows the generic shrink cannot build or does not reach: (model_type, config). Gemma-4 text in every combination its
# config allows (per-layer inputs, the MoE block, sliding and full attention layers; k = v, shared KV and a double-wide
# MLP on the last); DBRX with its flattened experts, also square ((experts · ffn) = hidden: both axes of w2 are hidden
# sized); JetMoE also with square attention experts, as JetMoE-8B has (kv_channels · kv heads = hidden).
VARIANTS: dict[str, tuple[str, dict]] = {
    "gemma4_text (dense)": ("gemma4_text", _GEMMA4),
    "gemma4_text (per-layer inputs)": ("gemma4_text", dict(_GEMMA4, hidden_size_per_layer_input=16)),
    "gemma4_text (MoE block)": ("gemma4_text", dict(_GEMMA4, **_GEMMA4_MOE)),
    "gemma4_text (MoE block, per-layer inputs)": ("gemma4_text", dict(_GEMMA4, **_GEMMA4_MOE, hidden_size_per_layer_input=16)),
    "gemma4_text (MoE block, per-layer inputs, k = v, shared KV, double-wide MLP)": (
        "gemma4_text", dict(_GEMMA4, **_GEMMA4_MOE, hidden_size_per_layer_input=16, num_hidden_layers=4,
                            layer_types=["sliding_attention", "full_attention"] * 2, attention_k_eq_v=True,
                            num_global_key_value_heads=1, num_kv_shared_layers=2, use_double_wide_mlp=True)),
    "dbrx": ("dbrx", _DBRX),
    "dbrx (square flattened experts)": ("dbrx", dict(_DBRX, ffn_config=dict(_DBRX["ffn_config"], ffn_hidden_size=16))),
    "jetmoe": ("jetmoe", _JETMOE),
    "jetmoe (square attention experts)": ("jetmoe", dict(_JETMOE, num_key_value_heads=4)),
}


def causal_lm_families() -> list[str]:
    """Every causal-LM model type transformers lists, and the `VARIANTS` rows."""
    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(VARIANTS))


def _shrink(values: dict) -> dict:
    out = {}
    for size, keys in _SIZES.items():
        for k in keys:
            if isinstance(values.get(k), int) and not isinstance(values.get(k), bool) and values[k] > size:
                out[k] = size
    # Mamba-2 mixers: heads × head dim must equal expand × hidden.
    expand = values.get("mamba_expand", values.get("expand"))
    for heads, dim in (("mamba_n_heads", "mamba_d_head"), ("mamba_n_heads", "mamba_head_dim"), ("num_heads", "head_dim")):
        if isinstance(expand, int) and isinstance(values.get(heads), int) and isinstance(values.get(dim), int) \
                and ("state_size" in values or "mamba_d_state" in values):
            out[heads] = expand * HIDDEN // out.get(dim, values[dim])
    if values.get("kv_lora_rank"):  # multi-head latent attention: keys have as many heads as queries
        for k in ("num_key_value_heads", "n_head_kv", "num_kv_heads"):
            if isinstance(values.get(k), int):
                out[k] = out.get("num_attention_heads", values.get("num_attention_heads"))
    for k, v in values.items():
        if k.endswith("_token_id") and isinstance(v, int) and v >= VOCAB:
            out[k] = 2
        if k.endswith(("_token_index", "_token_id")) and isinstance(v, int) and v >= VOCAB:
            out[k] = VOCAB - 1
        if isinstance(v, list) and k in ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types"):
            out[k] = v[:3] if len(set(v[:3])) > 1 or len(set(v)) == 1 else _mixed(v)
    return out


def _mixed(pattern: list) -> list:
    """The first three entries of a layer pattern, made to include each kind it has (hybrids stay hybrid)."""
    kinds = list(dict.fromkeys(pattern))
    return (kinds + pattern)[:max(3, len(kinds))]


def tiny_config(model_type: str):
    config = AutoConfig.for_model(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    updates = _shrink(text.to_dict())
    for k, v in updates.items():
        _set(text, k, v)
    if text is not config:
        for k, v in _shrink(config.to_dict()).items():
            if not isinstance(getattr(config, k, None), dict):
                _set(config, k, v)
        for sub in vars(config).values():  # vision / audio towers of multimodal wrappers
            if isinstance(sub, PretrainedConfig) and sub is not text:
                for k, v in _shrink(sub.to_dict()).items():
                    _set(sub, k, v)
    layer_types = getattr(text, "layer_types", None)
    if isinstance(layer_types, list) and "layer_types" not in updates:
        _set(text, "layer_types", layer_types[: getattr(text, "num_hidden_layers", 3)])
    return config


def _set(config, key, value) -> None:
    try:
        setattr(config, key, value)
    except AttributeError:  # a derived property (layer patterns computed from other fields)
        pass


def make_family_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny model of ``model_type`` (or a `VARIANTS` row) with random norm gains and biases (so post-norm
    gains matter)."""
    config = AutoConfig.for_model(VARIANTS[model_type][0], **VARIANTS[model_type][1]) if model_type in VARIANTS \
        else tiny_config(model_type)
    with torch.device("meta"):  # count first: some defaults the shrink misses (hash embeddings) are huge
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config, trust_remote_code=False).parameters())
    if n_params > MAX_PARAMS:
        raise ValueError(f"still {n_params / 1e6:.0f}M parameters after shrinking the default config")
    torch.manual_seed(seed)
    return randomize_parameters(AutoModelForCausalLM.from_config(config, trust_remote_code=False).eval().float())


def writer_vector_norms(model) -> list[torch.Tensor]:
    """Norm of every hidden-size vector of every residual writer's weight, one tensor per writer."""
    return [w.module._parameters[w.param].detach().norm(dim=w.hidden_axis).clone() for w in residual_writers(model)]


@contextmanager
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP contention on a shared 2-core machine (hundreds of times faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def layer_write_components(model, v: torch.Tensor, vocab: int = 128) -> list[float]:
    """Per layer, max over tokens of |<write, v>| / |write|, where write = layer output − layer input, on a fixed
    random-token input (independent of the probe the bake checks itself with)."""
    ratios = []

    def hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        write = (y - x).double().reshape(-1, v.numel())
        ratios.append(float(((write @ v.double()).abs() / write.norm(dim=-1).clamp_min(1e-30)).max()))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return ratios

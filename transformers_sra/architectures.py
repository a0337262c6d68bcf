"""The only module that knows model families: where each decoder layer writes to the residual stream.

A layout names, relative to one decoder layer, the attention-out writer, the root under which MLP
writers live (dense down projections, shared experts and fused 3-D expert tensors are all found there),
and, for post-norm families, the norm that stands between each sublayer and the residual add.
`LAYOUTS` maps ``config.model_type`` to a layout; unknown types fall back to trying every known
layout, and a model none of them fits exactly raises `UnsupportedModelError` before anything is edited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import UnsupportedModelError

# Leaf names of dense MLP writers (down projections) across families.
_MLP_WRITER_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2")
# Norm names that only post-norm (sandwich) families have; an unknown model with one of these is refused.
_POST_NORM_MARKERS = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_self_attn_layernorm", "post_attn_norm")


@dataclass(frozen=True)
class Layout:
    attn_writer: str  # path of the attention output projection inside a layer
    mlp_root: str  # subtree holding the MLP / MoE writers
    attn_post_norm: Optional[str] = None  # norm applied to the attention output before the residual add
    mlp_post_norm: Optional[str] = None


_PRE_NORM = Layout("self_attn.o_proj", "mlp")
_SANDWICH = Layout("self_attn.o_proj", "mlp", "post_attention_layernorm", "post_feedforward_layernorm")
_GPT2 = Layout("attn.c_proj", "mlp")
_NEOX = Layout("attention.dense", "mlp")  # parallel residual: both writes add to the same stream
_FALCON = Layout("self_attention.dense", "mlp")
_PHI = Layout("self_attn.dense", "mlp")
_GPTJ = Layout("attn.out_proj", "mlp")

LAYOUTS: dict[str, Layout] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "olmo", "cohere", "stablelm",
         "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "smollm3", "ministral"),
        _PRE_NORM,
    ),
    **dict.fromkeys(("gemma2", "gemma3", "gemma3_text", "olmo2", "olmo3"), _SANDWICH),
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    "falcon": _FALCON,
    "phi": _PHI,
    "gptj": _GPTJ,
}


@dataclass
class Writer:
    """One tensor that writes into the residual stream, with the axis that has the hidden size."""

    layer: int
    name: str  # module path in the model
    module: nn.Module
    param: str  # "weight" or, for fused experts, "down_proj"
    hidden_axis: int  # axis of `param` that indexes the residual stream
    bias: Optional[str]  # bias parameter name (last axis is the hidden one), if any
    post_norm: Optional[nn.Module]  # RMS-style norm between this writer and the residual add
    kind: str = "mlp"  # "attn" (attention out) or "mlp" (MLP down, experts): strength profiles treat them apart


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, wherever the family keeps it (``layers``, GPT-2's ``h``, ``blocks``)."""
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except (AttributeError, NotImplementedError):
            pass
    candidates += [getattr(model, "base_model", None), model]
    for root in candidates:
        for attr in ("layers", "h", "blocks"):
            layers = getattr(root, attr, None) if root is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__}; transformers-sra supports decoder-only causal LMs"
    )


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("hidden_size", "n_embd", "d_model"):
        if config is not None and isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise UnsupportedModelError(f"cannot read the hidden size of {type(model).__name__} from its config")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight (in, out); matched by name to avoid importing it.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _mlp_writers(root: nn.Module, root_name: str, hidden: int, layer: int, post_norm) -> list[Writer]:
    found = []
    for sub_name, module in root.named_modules():
        full = f"{root_name}.{sub_name}" if sub_name else root_name
        leaf = sub_name.rsplit(".", 1)[-1] if sub_name else root_name.rsplit(".", 1)[-1]
        fused = module._parameters.get("down_proj")
        if isinstance(fused, torch.Tensor) and fused.dim() == 3:
            # v5 fused experts: (E, hidden, inter), or (E, inter, hidden) when the class says is_transposed.
            axis = 2 if getattr(module, "is_transposed", False) else 1
            if fused.shape[axis] != hidden:
                raise UnsupportedModelError(f"{full}.down_proj has shape {tuple(fused.shape)}; expected hidden size {hidden} on axis {axis}")
            bias = "down_proj_bias" if isinstance(module._parameters.get("down_proj_bias"), torch.Tensor) else None
            found.append(Writer(layer, full, module, "down_proj", axis, bias, post_norm))
        elif leaf in _MLP_WRITER_NAMES and (isinstance(module, nn.Linear) or _is_conv1d(module)):
            axis = 1 if _is_conv1d(module) else 0
            bias = "bias" if getattr(module, "bias", None) is not None else None
            found.append(Writer(layer, full, module, "weight", axis, bias, post_norm))
    return found


def _resolve(layer_module: nn.Module, layout: Layout, index: int, prefix: str, hidden: int) -> list[Writer]:
    """Writers of one layer under `layout`; raises KeyError/UnsupportedModelError if the layout does not fit."""

    def norm(path):
        return layer_module.get_submodule(path) if path else None

    attn = layer_module.get_submodule(layout.attn_writer)
    if not (isinstance(attn, nn.Linear) or _is_conv1d(attn)):
        raise UnsupportedModelError(f"{prefix}.{layout.attn_writer} is a {type(attn).__name__}, not a linear writer")
    attn_axis = 1 if _is_conv1d(attn) else 0
    writers = [Writer(index, f"{prefix}.{layout.attn_writer}", attn, "weight", attn_axis,
                      "bias" if getattr(attn, "bias", None) is not None else None, norm(layout.attn_post_norm), "attn")]
    mlp = _mlp_writers(layer_module.get_submodule(layout.mlp_root), f"{prefix}.{layout.mlp_root}", hidden, index,
                       norm(layout.mlp_post_norm))
    if not mlp:
        raise UnsupportedModelError(f"no MLP writer found under {prefix}.{layout.mlp_root}")
    for w in writers + mlp:
        if w.module._parameters[w.param].shape[w.hidden_axis] != hidden:
            raise UnsupportedModelError(f"{w.name} does not write a hidden-size ({hidden}) output")
    return writers + mlp


def residual_writers(model: nn.Module, layers: Optional[list[int]] = None) -> list[Writer]:
    """Every residual-stream writer of the chosen decoder layers (all by default), in layer order.

    Raises `UnsupportedModelError` when the model's family is not in `LAYOUTS` and no known layout fits
    every layer, or when an unknown family has post-norms (a silent pre-norm edit would be wrong there).
    """
    blocks = decoder_layers(model)
    hidden = _hidden_size(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = {id(m): n for n, m in model.named_modules()}
    indices = range(len(blocks)) if layers is None else layers
    for i in indices:
        if not -len(blocks) <= i < len(blocks):
            raise UnsupportedModelError(f"layer {i} is out of range: the model has {len(blocks)} decoder layers")
    indices = [i % len(blocks) for i in indices]

    layout = LAYOUTS.get(model_type)
    if layout is None:
        layout = _fallback_layout(blocks[0], model_type, names[id(blocks[0])], hidden)
    writers = []
    for i in indices:
        try:
            writers += _resolve(blocks[i], layout, i, names[id(blocks[i])], hidden)
        except AttributeError as err:
            raise UnsupportedModelError(f"layer {i} of {model_type!r} does not match its writer layout: {err}") from None
    return writers


def _fallback_layout(block: nn.Module, model_type, prefix: str, hidden: int) -> Layout:
    module_names = {n.rsplit(".", 1)[-1] for n, _ in block.named_modules()}
    if module_names & set(_POST_NORM_MARKERS):
        raise UnsupportedModelError(
            f"model type {model_type!r} has post-sublayer norms and no entry in transformers_sra.architectures.LAYOUTS; "
            "add one naming its writers and post-norms"
        )
    for layout in dict.fromkeys(LAYOUTS.values()):
        if layout.attn_post_norm is not None:
            continue
        try:
            _resolve(block, layout, 0, prefix, hidden)
            return layout
        except (AttributeError, UnsupportedModelError):
            continue
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported: no known writer layout fits its decoder layers; "
        "add an entry to transformers_sra.architectures.LAYOUTS"
    )

"""Where each decoder layer writes to the residual stream: a table of known families, probing for the rest.

A layout names, relative to one decoder layer, the attention-out writer, the root under which MLP
writers live (dense down projections, shared experts and fused 3-D expert tensors are all found there),
and, for post-norm families, the norm that stands between each sublayer and the residual add.
`LAYOUTS` maps ``config.model_type`` to a layout: a fast path and a readable list of what is known. Every
other decoder-only model has its writers found by probing its layers' data flow (`probing.py`); every bake
then checks its own result (`editing.py`), so a wrong table entry or a missed writer is refused, not baked.
Encoder-decoder models and quantized weights are refused here, before anything is edited.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from .._torch_utils import get_decoder, text_config
from ..errors import UnsupportedModelError
from .probing import LayerCall, WriterSpec, capture_layer_calls, is_conv1d, layer_signature, probe_layer

# Leaf names of dense MLP writers (down projections) across families.
_MLP_WRITER_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2")


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
    post_norms: tuple[nn.Module, ...]  # norms (RMSNorm, LayerNorm, ...) between this writer and the residual add, innermost first
    kind: str = "mlp"  # "attn" (attention out) or "mlp" (MLP down, experts): strength profiles treat them apart
    constant: bool = False  # a post-norm's bias: added as it is at every token, so u is v itself
    carrier: Optional[nn.Module] = None  # where a constant is added when its own module is never called (JetMoE)

    @property
    def output_module(self) -> nn.Module:
        """The module whose output holds this writer's write: what hooks that act on the write attach to."""
        return self.carrier if self.carrier is not None else self.module


_LAYER_LISTS = ("layers", "h", "blocks", "layer", "decoder_layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, wherever the family keeps it (``layers``, GPT-2's ``h``, ``blocks``)."""
    candidates = [get_decoder(model), getattr(model, "base_model", None), model]
    for root in candidates:
        for attr in _LAYER_LISTS:
            layers = getattr(root, attr, None) if root is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    # Otherwise the shallowest list of blocks under a usual name (multimodal wrappers nest the text decoder).
    found = [(name.count("."), name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and name.rsplit(".", 1)[-1] in _LAYER_LISTS]
    if found:
        return min(found, key=lambda t: t[:2])[2]
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__}; transformers-sra supports decoder-only causal LMs"
    )


def model_hidden_size(model: nn.Module) -> int:
    config = text_config(model)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if config is not None and isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise UnsupportedModelError(f"cannot read the hidden size of {type(model).__name__} from its config")


def layer_indices(model: nn.Module, layers: Optional[list[int]] = None) -> list[int]:
    """``layers`` (negative counts from the end; None: all) as indices into `decoder_layers`."""
    n = len(decoder_layers(model))
    indices = range(n) if layers is None else layers
    for i in indices:
        if not -n <= i < n:
            raise UnsupportedModelError(f"layer {i} is out of range: the model has {n} decoder layers")
    return [i % n for i in indices]


def check_editable(model: nn.Module) -> None:
    """Refuse what no rank-one weight edit can serve, before anything is touched.

    Encoder-decoder models have a second residual stream the method does not address. Quantized weights (bitsandbytes
    int8/4-bit, GPTQ/AWQ packed integers, fp8, packed GGUF blocks) would be edited without their scales, silently
    corrupting the model, so they are refused from ``hf_quantizer`` and from the parameter types.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; transformers-sra edits decoder-only causal LMs")
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(quantizer, "quantization_config", None)
    method = getattr(qconfig, "quant_method", None) or type(quantizer).__name__
    if quantizer is not None and not getattr(qconfig, "dequantize", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} has quantized weights ({getattr(method, 'value', method)}); a rank-one edit cannot "
            "be applied to packed or scaled weights: load the model dequantized (no quantization_config, dtype=torch.bfloat16 "
            "or float32) and quantize after the bake")
    params = {id(p) for p in model.parameters()}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        packed = leaf in _PACKED_NAMES or "quant" in type(t).__name__.lower() or type(t).__name__ in ("Params4bit", "Int8Params")
        # Integer buffers (position ids, masks, expert maps) are fine; integer or 1-byte weight matrices are not.
        if packed or (id(t) in params and t.dim() >= 2 and (not t.is_floating_point() or t.element_size() == 1)):
            raise UnsupportedModelError(
                f"{name} is stored as {type(t).__name__} of {t.dtype}: quantized weights cannot be edited exactly; "
                "load the model dequantized (dtype=torch.bfloat16 or float32) and quantize after the bake")


# Buffer names that GPTQ, AWQ, Marlin and similar kernels use for packed integer weights and their scales.
_PACKED_NAMES = ("qweight", "qzeros", "g_idx", "weight_packed", "weight_scale", "weight_scale_inv", "SCB", "absmax")


def _linear_writer(module: nn.Module, path: str, hidden: int) -> tuple[int, Optional[str]]:
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise UnsupportedModelError(f"{path} is a {type(module).__name__}, not a linear writer")
    axis = 1 if is_conv1d(module) else 0
    return axis, "bias" if getattr(module, "bias", None) is not None else None


def _table_specs(block: nn.Module, layout: Layout, hidden: int, prefix: str) -> list[WriterSpec]:
    """Writers of one layer under its table layout; raises AttributeError/UnsupportedModelError if it does not fit."""
    specs = [WriterSpec(layout.attn_writer, "weight", *_linear_writer(block.get_submodule(layout.attn_writer),
                                                                      f"{prefix}.{layout.attn_writer}", hidden),
                        _posts(layout.attn_post_norm), "attn")]
    root = block.get_submodule(layout.mlp_root)
    mlp = []
    for sub_name, module in root.named_modules():
        path = f"{layout.mlp_root}.{sub_name}" if sub_name else layout.mlp_root
        fused = module._parameters.get("down_proj")
        if isinstance(fused, torch.Tensor) and fused.dim() == 3:
            # v5 fused experts: (E, hidden, inter), or (E, inter, hidden) when the class says is_transposed.
            axis = 2 if getattr(module, "is_transposed", False) else 1
            bias = "down_proj_bias" if isinstance(module._parameters.get("down_proj_bias"), torch.Tensor) else None
            mlp.append(WriterSpec(path, "down_proj", axis, bias, _posts(layout.mlp_post_norm), "mlp"))
        elif path.rsplit(".", 1)[-1] in _MLP_WRITER_NAMES and (isinstance(module, nn.Linear) or is_conv1d(module)):
            mlp.append(WriterSpec(path, "weight", *_linear_writer(module, f"{prefix}.{path}", hidden),
                                  _posts(layout.mlp_post_norm), "mlp"))
    if not mlp:
        raise UnsupportedModelError(f"no MLP writer found under {prefix}.{layout.mlp_root}")
    specs += mlp
    for post, kind in ((layout.attn_post_norm, "attn"), (layout.mlp_post_norm, "mlp")):
        bias = block.get_submodule(post)._parameters.get("bias") if post else None
        if isinstance(bias, torch.Tensor):
            specs.append(WriterSpec(post, "bias", 0, None, (), kind, constant=True))
    return specs


def _posts(norm: Optional[str]) -> tuple[str, ...]:
    return (norm,) if norm else ()


def _writer(block: nn.Module, spec: WriterSpec, index: int, prefix: str, hidden: int) -> Writer:
    module = block.get_submodule(spec.path)
    param = module._parameters.get(spec.param)
    if not isinstance(param, torch.Tensor) or param.shape[spec.hidden_axis] != hidden:
        raise UnsupportedModelError(f"{prefix}.{spec.path}.{spec.param} does not write a hidden-size ({hidden}) output")
    posts = tuple(block.get_submodule(n) for n in spec.post_norms)
    carrier = block.get_submodule(spec.carrier) if spec.carrier else None
    return Writer(index, f"{prefix}.{spec.path}", module, spec.param, spec.hidden_axis, spec.bias, posts, spec.kind,
                  spec.constant, carrier)


def residual_writers(model: nn.Module, layers: Optional[list[int]] = None, *, method: str = "auto",
                     calls: Optional[dict[int, LayerCall]] = None, recorded: Optional[Mapping] = None) -> list[Writer]:
    """Every residual-stream writer of the chosen decoder layers (all by default), in layer order.

    ``method``: "auto" reads `LAYOUTS` for known families and probes the rest; "table" or "probe" forces one.
    ``calls`` are recorded layer calls to probe with (`probing.capture_layer_calls`); one forward is run if needed.
    ``recorded``: the writers as `writer_record` wrote them down when the edit was made (the report keeps them);
    they are used as they are, so the streaming bake edits a meta-device model, which cannot be probed, exactly
    as the in-memory bake did.
    Raises `UnsupportedModelError` (before any edit) for encoder-decoder or quantized models, for a known family
    whose layers do not match its table entry, and for a layer in which probing finds no writer.
    """
    check_editable(model)
    blocks = decoder_layers(model)
    hidden = model_hidden_size(model)
    names = {id(m): n for n, m in model.named_modules()}
    indices = layer_indices(model, layers)
    specs = _layer_specs(model, indices, method, calls, recorded)
    return [_writer(blocks[i], s, i, names[id(blocks[i])], hidden) for i in indices for s in specs[i]]


def writer_record(model: nn.Module, layers: Optional[list[int]] = None) -> dict[str, list[dict]]:
    """The writers of the chosen layers as plain data, ``{layer: [WriterSpec fields]}``, for `residual_writers`'s
    ``recorded``: what probing found (tensor, hidden axis, post-norms) travels in the report to `sra bake`."""
    specs = _layer_specs(model, layer_indices(model, layers), "auto", None, None)
    # JSON types throughout (post-norm paths as a list), so a saved and reloaded report compares equal
    return {str(i): [{**asdict(s), "post_norms": list(s.post_norms)} for s in layer] for i, layer in specs.items()}


def _layer_specs(model: nn.Module, indices: list[int], method: str, calls: Optional[dict[int, LayerCall]],
                 recorded: Optional[Mapping]) -> dict[int, list[WriterSpec]]:
    blocks = decoder_layers(model)
    hidden = model_hidden_size(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = {id(m): n for n, m in model.named_modules()}
    layout = LAYOUTS.get(model_type) if method != "probe" and recorded is None else None
    if layout is None and method == "table" and recorded is None:
        raise UnsupportedModelError(f"model type {model_type!r} has no entry in transformers_sra.models.architectures.LAYOUTS")

    specs: dict[int, list[WriterSpec]] = {}
    if recorded is not None:
        missing = [i for i in indices if str(i) not in recorded]
        if missing:
            raise UnsupportedModelError(f"the recorded writers have no entry for layer {missing[0]}")
        specs = {i: [WriterSpec(**{**s, "post_norms": tuple(s["post_norms"])}) for s in recorded[str(i)]]
                 for i in indices}
    elif layout is not None:
        for i in indices:
            try:
                specs[i] = _table_specs(blocks[i], layout, hidden, names[id(blocks[i])])
            except AttributeError as err:
                raise UnsupportedModelError(f"layer {i} of {model_type!r} does not match its writer layout: {err}") from None
    else:
        specs = _probe(model, blocks, indices, hidden, calls)
    for i in indices:
        if not specs[i]:
            raise UnsupportedModelError(
                f"no residual-stream writer found in layer {i} ({type(blocks[i]).__name__}) of {model_type!r}: "
                "its write to the residual stream does not pass through a linear map that a rank-one edit can reach")
    return specs


_PROBED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _probe(model, blocks, indices, hidden, calls) -> dict[int, list[WriterSpec]]:
    """Probe one layer of each kind (layer signature) among ``indices``; cached per model."""
    cache = _PROBED.setdefault(model, {})
    first: dict[tuple, int] = {}
    for i in indices:
        first.setdefault(layer_signature(blocks[i]), i)
    todo = {sig: i for sig, i in first.items() if sig not in cache}
    if todo:
        missing = [i for i in todo.values() if calls is None or i not in calls]
        recorded = dict(calls or {})
        if missing:
            recorded.update(capture_layer_calls(model, blocks, missing, hidden))
        for sig, i in todo.items():
            cache[sig] = probe_layer(blocks[i], recorded[i], hidden)
    return {i: cache[layer_signature(blocks[i])] for i in indices}

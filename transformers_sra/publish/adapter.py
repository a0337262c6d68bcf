"""The bake as a PEFT LoRA adapter: ship a few MB instead of a checkpoint, switch the edit off, or scale it.

A bake changes each writer ``y = W x + b`` (W's hidden axis is its output axis) to
``W' = W − γ u (uᵀW)`` and ``b' = b − γ u (uᵀb)``: a rank-one update ``ΔW = B A`` with ``B = −γu`` and
``A = uᵀW``. Stacked bakes add one rank each; taking A from the weight *as it was before that bake* (the
coefficients the `BakeHandle` keeps for undo) makes the sum of the ranks equal the sequential bakes exactly,
whatever the directions. peft's scaling ``lora_alpha / r`` is 1. Where it lives:

- `nn.Linear` writers: ``target_modules`` (GPT-2's Conv1D, stored (in, out), with ``fan_in_fan_out``);
  a bias edit goes into the bias of ``lora_B`` (``lora_bias=True``), which peft scales with the adapter too.
- fused 3-D expert tensors: ``target_parameters``, rank r per expert (``A_e = uᵀW_e``).
- post-norm writers need nothing special: ``u ∝ Aᵀv`` is already folded into the edit of their weight.

peft itself is then asked, on an empty (meta) copy of the model and through its own loading, whether it wraps
exactly these tensors and loads every factor (`peft_mismatch`): its transformers-v4 compatibility renames some
targets and keys. A Linear it would miss is reached through ``target_parameters`` instead; anything else it would
get wrong is refused. Refused too, all before anything is written: norm-preserving bakes (a per-vector rescale is
not low rank), and, unless ``full_modules=True``, what no LoRA layer reaches: a bare bias added on its own (JetMoE's
blocks, a post-norm's bias), biases of fused experts and 2-D weights outside Linear/Conv1D (DBRX's flattened ``w2``,
read by the parent module, which peft's ``target_parameters`` wrapper hides). With ``full_modules=True`` the
modules that own those tensors travel whole, baked, as peft's ``modules_to_save``: exact, but peft needs every
tensor of such a module in the adapter (``set_peft_model_state_dict`` indexes each one) and copies the module
again in memory when it loads, so for these families the adapter is about as large as the model, and
``rescale_adapter_scale`` does not scale those copies::

    report = apply_surgical_ablation(model, tokenizer)
    export_adapter(report, model, "qwen-sra-lora/")          # or a report loaded from JSON and the unedited base
    peft_model = PeftModel.from_pretrained(base, "qwen-sra-lora/")   # == the baked model
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..folders import atomic_folder, check_output_dir
from ..method.editing import reapply_edit
from ..models.architectures import residual_writers
from ..models.probing import is_conv1d as _is_conv1d
from ..models.weights import read_param, write_param
from ..report import REPORT_NAME, SRAReport

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # where peft's PeftModel puts the wrapped model's modules
_NORM_PRESERVING = ("a norm-preserving bake rescales every hidden-size vector after projecting, which is not a low-rank "
                    "update; export the adapter from a bake with norm_preserving=False, or save the checkpoint instead")


@dataclass
class _Target:
    """The LoRA factors of one writer tensor: one rank per bake, zero where a bake left it alone."""

    name: str  # module path in the model
    param: str
    experts: int  # 1 for a 2-D weight
    fused: bool  # a 3-D expert tensor
    conv1d: bool
    by_parameter: bool = False  # reached with target_parameters (fused experts; Linears peft would not target)
    a: list = field(default_factory=list)  # per rank: (experts, in) coefficients uᵀW
    b: list = field(default_factory=list)  # per rank: (out,) = −γu
    bias: Optional[torch.Tensor] = None  # summed bias edit −Σγu(uᵀb), if the writer has a bias


def check_adapter_dependencies() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError("exporting a LoRA adapter needs peft: pip install 'transformers-sra[adapter]'")


def _live_handles(report: SRAReport, model: nn.Module) -> list:
    modules = {id(m) for m in model.modules()}
    for handle in report.handles:
        for edit in handle._edits:
            if id(edit.writer.module) not in modules:
                raise ConfigError("the report's live edit belongs to another model; pass the model the report edited, "
                                  "or a report loaded from JSON with the unedited base model")
    return report.handles


def _beyond_lora(w, t: torch.Tensor) -> Optional[str]:
    """Why no LoRA layer can hold the edit of writer ``w`` (tensor ``t``) exactly, or None when one can."""
    fused = t.dim() == 3
    if w.constant:
        return (f"{w.name}.{w.param} is a bias added on its own (a post-norm's bias or a separate bias parameter), "
                "which no LoRA layer can edit")
    if not fused and not (isinstance(w.module, nn.Linear) and w.hidden_axis == 0 or _is_conv1d(w.module) and w.hidden_axis == 1):
        return (f"{w.name}.{w.param} ({type(w.module).__name__}, {t.dim()}-D) is neither a Linear/Conv1D writer nor a "
                "fused 3-D expert tensor, so peft's LoRA cannot target it exactly")
    if fused and w.bias is not None:
        return f"{w.name}.{w.bias} is a fused expert bias; peft's target_parameters LoRA has no bias (lora_bias)"
    return None


def adapter_targets(handles: list) -> tuple[list[_Target], dict[str, str]]:
    """Group the bakes' edits into LoRA factors per writer tensor, and name the modules whose edit no LoRA holds
    exactly (module path → why): those, and every edited tensor inside them, can only travel as full modules."""
    rank = len(handles)
    targets: dict[str, _Target] = {}
    full: dict[str, str] = {}
    for k, handle in enumerate(handles):
        for edit in handle._edits:
            w = edit.writer
            if edit.scale is not None:
                raise UnsupportedModelError(_NORM_PRESERVING)
            t = w.module._parameters[w.param]
            why = _beyond_lora(w, t)
            if why is not None:
                full.setdefault(w.name, why)
                continue
            fused = t.dim() == 3
            key = f"{w.name}.{w.param}"
            target = targets.get(key)
            if target is None:
                experts = t.shape[0] if fused else 1
                target = targets[key] = _Target(w.name, w.param, experts, fused, _is_conv1d(w.module), by_parameter=fused)
            u = edit.u.detach().to("cpu", torch.float32)
            coef = edit.coef.detach().to("cpu", torch.float32)
            if edit.param == w.bias:
                delta = -edit.strength * coef * u  # the bias edit: b' − b = −γ u (uᵀb)
                target.bias = delta if target.bias is None else target.bias + delta
                continue
            # Pad the bakes that skipped this writer with zero ranks (exact; keeps one r for the whole adapter).
            while len(target.a) < k:
                target.a.append(torch.zeros_like(coef.reshape(target.experts, -1)))
                target.b.append(torch.zeros_like(u))
            target.a.append(coef.reshape(target.experts, -1))
            target.b.append(-edit.strength * u)
    # peft never puts a LoRA or another copy inside a modules_to_save module: an edit there travels in its baked copy.
    def inside(name: str, strictly: bool = False) -> bool:
        return any(name.startswith(m + ".") or name == m and not strictly for m in full)

    full = {name: why for name, why in full.items() if not inside(name, strictly=True)}
    targets = {key: t for key, t in targets.items() if not inside(t.name)}
    for target in targets.values():
        while len(target.a) < rank:
            target.a.append(torch.zeros_like(target.a[0]))
            target.b.append(torch.zeros_like(target.b[0]))
    if any(t.conv1d for t in targets.values()) and not all(t.conv1d or t.fused for t in targets.values()):
        raise UnsupportedModelError("the model mixes Conv1D and Linear writers; one peft adapter sets fan_in_fan_out "
                                    "for all of them, so this edit can only be saved as a checkpoint")
    if any(t.by_parameter for t in targets.values()) and any(t.bias is not None for t in targets.values()):
        raise UnsupportedModelError("the edit changes biases (lora_bias) and fused expert tensors (target_parameters), "
                                    "which peft cannot combine in one adapter; save the checkpoint instead")
    return list(targets.values()), full


def _module_bytes(model: nn.Module, names) -> int:
    modules = dict(model.named_modules())
    return sum(t.numel() * t.element_size() for n in names for t in modules[n].state_dict().values())


def check_full_modules(model: nn.Module, full: dict[str, str], allowed: bool) -> None:
    """Refuse, in one line, an edit that needs full module copies unless the caller asked for them."""
    if not full or allowed:
        return
    names = sorted(full)
    size = _module_bytes(model, names)
    share = size / max(1, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    raise UnsupportedModelError(
        f"{full[names[0]]}; peft carries this edit only as full copies of the modules that hold it (modules_to_save: "
        f"{names[0]}{more}, {size / 1e6:.1f} MB, {share:.0%} of the model's weights, copied again in memory when "
        "loaded): pass full_modules=True (sra export-adapter --full-modules) for that adapter, or save the "
        "checkpoint instead (sra bake / save_cleaned)")


def full_module_state(model: nn.Module, full: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """The ``modules_to_save`` tensors per module path: every tensor of each module, read while the model is baked
    (peft's loading looks up each one; the unedited ones equal the base's)."""
    modules = dict(model.named_modules())
    return {name: {k: v.detach().to("cpu", copy=True).contiguous() for k, v in modules[name].state_dict().items()}
            for name in sorted(full)}


def adapter_state_dict(targets: list[_Target]) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``, named as peft saves them."""
    tensors = {}
    with_bias = any(t.bias is not None for t in targets)
    for t in targets:
        prefix = f"{_PREFIX}{t.name}"
        a = torch.stack(t.a, dim=1)  # (experts, r, in)
        b = torch.stack(t.b, dim=1)  # (out, r)
        r = b.shape[1]
        # peft lays a fused tensor's ranks out expert-major in A (row e·r + k) and rank-major in B (column k·E + e).
        tensors[f"{prefix}.lora_A.weight"] = a.reshape(t.experts * r, -1).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.repeat_interleave(t.experts, dim=1).contiguous()
        if with_bias:
            tensors[f"{prefix}.lora_B.bias"] = t.bias if t.bias is not None else torch.zeros(b.shape[0])
    return tensors


def adapter_config(targets: list[_Target], rank: int, base_model: str, full: tuple = ()):
    from peft import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    modules = sorted(t.name for t in targets if not t.by_parameter)
    parameters = sorted(f"{t.name}.{t.param}" for t in targets if t.by_parameter)
    return LoraConfig(
        r=rank, lora_alpha=rank,  # scaling = alpha / r = 1: the factors hold the edit as it is
        # peft's own placeholder when only modules_to_save carry the adapter (no LoRA layer at all)
        target_modules=modules or ([] if parameters or not full else DUMMY_TARGET_MODULES),
        target_parameters=parameters or None, modules_to_save=sorted(full) or None,
        fan_in_fan_out=any(t.conv1d for t in targets), lora_bias=any(t.bias is not None for t in targets),
        lora_dropout=0.0, bias="none", use_rslora=False, init_lora_weights=True, task_type="CAUSAL_LM",
        base_model_name_or_path=base_model)


def peft_mismatch(model: nn.Module, config, tensors: dict) -> Optional[str]:
    """What peft itself would get wrong loading this adapter onto ``model``, tried on an empty (meta) copy of it
    through peft's own loading (its transformers-v5 renamings included): a target it refuses or renames (its v4 MoE
    compatibility maps ``*.down_proj`` module targets to expert tensors), a tensor it would not load (a checkpoint
    renaming that also matches our key), or a factor shape it expects differently (an expert layout read the other
    way round). None when it wraps exactly our targets and loads every tensor."""
    import copy

    from peft import get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    from_config = getattr(type(model), "_from_config", None)
    if from_config is None:
        return f"{type(model).__name__} is not a transformers model, so peft's targeting cannot be checked"
    try:
        with torch.device("meta"):
            skeleton = get_peft_model(from_config(copy.deepcopy(model.config)), copy.deepcopy(config))
        loaded = set_peft_model_state_dict(skeleton, {k: v.to("meta") for k, v in tensors.items()})
    except Exception as err:  # peft's own refusal (LoRA on Mamba's out_proj) or a shape it reads otherwise
        return " ".join(str(err).split())[:300] or type(err).__name__
    found, wrapped = set(), set()
    for name, module in skeleton.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            found.add(name.replace(".default", ""))
        if isinstance(module, ModulesToSaveWrapper) and "default" in module.modules_to_save:
            wrapped.add(name)
    ours = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    saved = {f"{_PREFIX}{m}" for m in (config.modules_to_save or [])}
    unloaded = [k for k in loaded.missing_keys if ".lora_" in k or ".modules_to_save." in k] + list(loaded.unexpected_keys)
    parts = [f"{what}: {', '.join(sorted(names))}" for what, names in
             (("not targeted", ours - found), ("targeted besides", found - ours), ("not copied", saved - wrapped),
              ("copied besides", wrapped - saved), ("not loaded", unloaded)) if names]
    return "; ".join(parts)[:300] or None


def _checked(model: nn.Module, targets: list[_Target], rank: int, base: str, full: dict[str, dict]):
    """The adapter's config and tensors, once peft is seen to target exactly the edited tensors with our shapes
    and to copy exactly the full modules (``full``: their tensors, from `full_module_state`).

    A Linear writer that peft's module targeting misses is tried once more through ``target_parameters`` (its
    ``weight``), which no renaming touches."""
    modules = tuple(sorted(full))
    tensors = adapter_state_dict(targets)
    tensors.update({f"{_PREFIX}{m}.{k}": v for m in modules for k, v in full[m].items()})  # as peft saves them
    config = adapter_config(targets, rank, base, modules)
    problem = peft_mismatch(model, config, tensors)
    movable = [t for t in targets if not t.by_parameter and not t.conv1d and t.bias is None]
    if problem and movable:
        for t in movable:
            t.by_parameter = True
        config = adapter_config(targets, rank, base, modules)
        problem = peft_mismatch(model, config, tensors) and problem
    if problem:
        import peft

        raise UnsupportedModelError(f"peft {peft.__version__} would not load this edit onto the model exactly ({problem}); "
                                    "save the checkpoint instead (sra ablate / save_cleaned)")
    return config, tensors


def export_adapter(report: SRAReport, model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
                   card: bool = True, base_model: Optional[str] = None, full_modules: bool = False) -> Path:
    """Write ``report``'s edit as a PEFT LoRA adapter folder, all or nothing; returns the folder.

    ``model`` is the model the live ``report`` edited, or, for a report loaded from JSON, the unedited base
    (the edit is baked again to read its factors; the weights get their originals back bit for bit). Loading the
    folder with ``PeftModel.from_pretrained(base, path)`` reproduces the baked model; ``disable_adapter()`` gives
    the base back and ``peft.helpers.rescale_adapter_scale(peft_model, s)`` makes every γ sγ. ``base_model`` (a Hub
    id) overrides the one inferred from the report. Raises `UnsupportedModelError` for edits a LoRA cannot hold exactly,
    unless ``full_modules`` lets the modules that own them travel whole (peft's ``modules_to_save``, baked): exact,
    but as large as those modules, and ``rescale_adapter_scale`` leaves them as they are.
    """
    check_adapter_dependencies()
    if report.config.get("norm_preserving"):
        raise UnsupportedModelError(_NORM_PRESERVING)
    target = check_output_dir(path, overwrite)
    from safetensors.torch import save_file

    from .card import base_model_info, render_adapter_card

    edited = nullcontext(_live_handles(report, model)) if report.handles else _baked_then_restored(model, report)
    with edited as handles:
        targets, full = adapter_targets(handles)
        check_full_modules(model, full, full_modules)
        copies = full_module_state(model, full)  # read while the model is baked
    if not targets and not copies:
        raise ConfigError("the report's edit changed no weight (every strength is 0); there is nothing to export")
    rank = len(handles)
    known_id, _ = base_model_info(report.model_name)
    base = base_model or known_id or report.model_name
    config, tensors = _checked(model, targets, rank, base, copies)
    with atomic_folder(target, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        report.save(tmp / REPORT_NAME)
        if card:
            render_adapter_card(report, base_model=base_model, rank=rank, full_modules=sorted(copies),
                                size_mb=(tmp / ADAPTER_WEIGHTS).stat().st_size / 1e6).save(tmp / "README.md")
    return target


@contextmanager
def _baked_then_restored(model: nn.Module, report: SRAReport) -> Iterator[list]:
    """Bake the report's edit into the unedited ``model`` and yield the handles; afterwards every edited tensor
    gets its saved original back, bit for bit (``undo()`` would leave rounding, a full ulp in bf16)."""
    saved = [(w.module, name, read_param(w.module, name).to(w.module._parameters[name].dtype))
             for w in residual_writers(model, report.config.get("layers")) for name in (w.param, w.bias) if name]
    try:
        yield list(reapply_edit(model, report))
    finally:
        report.attach([])
        for module, name, original in saved:
            write_param(module, name, original)

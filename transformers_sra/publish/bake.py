"""Bake a saved edit into a checkpoint shard by shard, without instantiating the model: for checkpoints larger
than memory.

The model is built on the meta device from its config, only to find the residual writers and the parameter
names. The writers are the ones the report recorded when the edit was made (`architectures.writer_record`: what
probing found, tensor, hidden axis and post-norms), so the streamed edit is the in-memory one; a report without
them falls back to the `LAYOUTS` table (probing runs real forward passes, which a meta model cannot).
Post-norms (for ``u ∝ Aᵀv``) get their real gains from the shards, which are small. Each shard is
then read with ``safe_open``, its writer tensors are edited in fp32 by `editing.edit_tensor` (the in-memory
bake's own code, so an fp32 result equals ``reapply_edit`` + ``save_pretrained`` bit for bit) and cast back,
and the shard is written under the same name; every other tensor is copied as it is (tied embeddings are not
writers and stay as stored). Checkpoint names that differ from the model's (fused experts saved one expert
per tensor, renamed modules) are mapped with transformers' own save-time conversion. Peak memory is about
one shard plus one writer::

    stream_bake("big-model/", "sra_report.json", "big-model-sra/")
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..folders import atomic_folder, check_output_dir
from ..method.editing import edit_tensor, plan_writers
from ..models.architectures import LAYOUTS, Writer, residual_writers
from ..report import REPORT_NAME, SRAReport

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weight files that would hold the unedited model next to the edited shards: never copied to the output.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".safetensors")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass
class _Source:
    """Where a model tensor lives in the checkpoint: one tensor under its own or another name, or several pieces
    (fused experts stored one per expert); ``index`` holds each piece's flat positions in the model tensor."""

    shape: torch.Size
    keys: list[str]
    index: Optional[list[torch.Tensor]] = None
    shapes: list = field(default_factory=list)  # each piece's shape (when pieces)


@dataclass
class _Group:
    """One model tensor to edit: its checkpoint source and the edits to apply in order, ``(u, axis, γ, rescale)``."""

    source: _Source
    edits: list = field(default_factory=list)


class _Checkpoint:
    """The shards of a safetensors checkpoint: which file holds each key, and reads of single tensors."""

    def __init__(self, folder: Path):
        index = folder / INDEX_NAME
        if index.is_file():
            self.weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (folder / SINGLE_NAME).is_file():
            with safe_open(str(folder / SINGLE_NAME), "pt") as f:
                self.weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise ConfigError(f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}: the streaming bake reads safetensors "
                              "checkpoints (load and re-save other formats with save_pretrained first)")
        self.folder = folder
        self.shards = sorted(set(self.weight_map.values()))
        missing = [s for s in self.shards if not (folder / s).is_file()]
        if missing:
            raise ConfigError(f"{folder} lists shard {missing[0]} in {INDEX_NAME}, but the file is missing")

    def read(self, key: str) -> torch.Tensor:
        with safe_open(str(self.folder / self.weight_map[key]), "pt") as f:
            return f.get_tensor(key)

    def dtype(self, key: str) -> str:
        with safe_open(str(self.folder / self.weight_map[key]), "pt") as f:
            return f.get_slice(key).get_dtype()


def _meta_model(folder: Path, report: SRAReport) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot read the config of {folder}: {first}") from None
    if getattr(config, "quantization_config", None):
        raise UnsupportedModelError(f"{folder} holds quantized weights; a rank-one edit cannot be applied to packed or "
                                    "scaled weights: bake a dequantized (bf16/fp32) checkpoint and quantize after")
    if config.model_type not in LAYOUTS and not report.writers:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} has no entry in transformers_sra.models.architectures.LAYOUTS and the report "
            "records no writers, so they must be found by probing forward passes, which the streaming bake cannot run: "
            "use a report written by this version of sra ablate, load the model and bake it in memory (sra ablate, or "
            "editing.reapply_edit + save_pretrained), or add a LAYOUTS entry")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


def _source(model: nn.Module, key: str, shape: torch.Size, ckpt: _Checkpoint) -> _Source:
    """Map the model tensor ``key`` to its checkpoint tensors with transformers' save-time conversion, run on an
    index tensor: each piece then holds the flat positions of its values in the model tensor."""
    if key in ckpt.weight_map:
        return _Source(shape, [key])
    try:
        from transformers.core_model_loading import revert_weight_conversion  # transformers 5's save-time renames

        pieces = revert_weight_conversion(model, {key: torch.arange(shape.numel()).reshape(shape)})
    except Exception as err:  # any failure of the conversion table means we cannot locate the tensor: refuse
        raise UnsupportedModelError(f"cannot map {key} to the checkpoint's tensor names: {err}") from None
    missing = [k for k in pieces if k not in ckpt.weight_map]
    if not pieces or missing:
        raise UnsupportedModelError(
            f"the checkpoint has no tensor {missing[0] if missing else key} (for the model's {key}): it names its "
            "weights differently from what transformers saves; re-save it with save_pretrained or bake it in memory")
    return _Source(shape, list(pieces), [p.reshape(-1) for p in pieces.values()], [p.shape for p in pieces.values()])


def _load(src: _Source, ckpt: _Checkpoint) -> torch.Tensor:
    if src.index is None:
        return ckpt.read(src.keys[0])
    pieces = [ckpt.read(k) for k in src.keys]
    whole = torch.empty(src.shape.numel(), dtype=pieces[0].dtype)
    for piece, index in zip(pieces, src.index):
        whole[index] = piece.reshape(-1)
    return whole.reshape(src.shape)


def _split(src: _Source, whole: torch.Tensor) -> dict[str, torch.Tensor]:
    if src.index is None:
        return {src.keys[0]: whole}
    flat = whole.reshape(-1)
    return {k: flat[index].reshape(shape) for k, index, shape in zip(src.keys, src.index, src.shapes)}


def _materialize_norms(model: nn.Module, writers: list[Writer], ckpt: _Checkpoint) -> dict[str, nn.Module]:
    """Give each post-norm its real parameters from the shards (u ∝ Aᵀv needs its gain); returns them by name."""
    names = {id(m): n for n, m in model.named_modules()}
    norms = {}
    for w in writers:
        for norm in (*w.post_norms, w.module if w.constant else None):
            if norm is None or names[id(norm)] in norms:
                continue
            name = names[id(norm)]
            if any(b.device.type == "meta" for b in norm.buffers()):
                raise UnsupportedModelError(f"post-norm {name} has buffers that are not in the checkpoint; bake in memory")
            for pname, param in list(norm._parameters.items()):
                if param is not None:
                    src = _source(model, f"{name}.{pname}", param.shape, ckpt)
                    norm._parameters[pname] = nn.Parameter(_load(src, ckpt), requires_grad=False)
            norms[name] = norm
    return norms


def _plan(model: nn.Module, report: SRAReport, ckpt: _Checkpoint) -> dict[str, _Group]:
    """Every writer tensor's checkpoint source and its edits, bake after bake as `editing.reapply_edit` does."""
    writers = residual_writers(model, report.config.get("layers"), method="table", recorded=report.writers or None)
    norms = _materialize_norms(model, writers, ckpt)
    norm_preserving = bool(report.config.get("norm_preserving", False))
    bakes = report.bakes()
    groups: dict[str, _Group] = {}
    for i, (direction, strength) in enumerate(bakes):
        for p in plan_writers(model, writers, direction, strength, [d for d, _ in bakes[:i]]):
            if p.gamma <= 0:
                continue
            w = p.writer
            for name, axis in ((w.param, w.hidden_axis), (w.bias, -1)):
                if name is None:
                    continue
                key = f"{w.name}.{name}"
                if key not in groups:
                    groups[key] = _Group(_source(model, key, w.module._parameters[name].shape, ckpt))
                groups[key].edits.append((p.u, axis, p.gamma, norm_preserving and name == w.param))
            if w.constant and w.name in norms:
                # A post-norm's bias is a writer itself: later bakes read the norm with its edited bias, as in memory.
                t = norms[w.name]._parameters[w.param]
                new, _, _ = edit_tensor(t.detach().to(torch.float32, copy=True), p.u, -1, p.gamma)
                norms[w.name]._parameters[w.param] = nn.Parameter(new.to(t.dtype), requires_grad=False)
    for key, group in groups.items():
        for k in group.source.keys:
            if ckpt.dtype(k) not in _FLOAT_DTYPES:
                raise UnsupportedModelError(f"{k} is stored as {ckpt.dtype(k)}: quantized weights cannot be edited "
                                            "exactly; bake a dequantized (bf16/fp32) checkpoint and quantize after")
    return groups


def _edited(group: _Group, ckpt: _Checkpoint) -> dict[str, torch.Tensor]:
    """The group's checkpoint tensors after its edits: fp32 math, cast back after each bake as `write_param` does."""
    t = _load(group.source, ckpt)
    for u, axis, gamma, rescale in group.edits:
        new, _, _ = edit_tensor(t.to(torch.float32, copy=True), u, axis, gamma, rescale)
        t = new.to(t.dtype)
    return _split(group.source, t)


def stream_bake(model_dir: Union[str, os.PathLike], report: Union[SRAReport, str, os.PathLike],
                output_dir: Union[str, os.PathLike], *, overwrite: bool = False,
                progress: Optional[Callable[[str, int, int], None]] = None) -> Path:
    """Apply ``report``'s edit to the safetensors checkpoint in ``model_dir`` and write the result to ``output_dir``.

    The edit is the report's, as `editing.reapply_edit` bakes it (first direction with the report's strength
    profile, each accepted mining pass with its flat γ, each orthogonal to the earlier ones, on the report's layers,
    norm-preserving if the run was). The report may come from a run on any copy of the same model (offloaded with
    ``device_map="auto"`` included): it holds directions, not weights. Config, tokenizer and index files are copied,
    other weight formats are left out, and ``sra_report.json`` is written. The output folder is written all or
    nothing; errors (no safetensors, a family that needs probing and a report without writers, quantized weights)
    are raised before writing. ``progress(step, i, n)`` is called after each shard. Unlike the in-memory bake there is
    no forward-pass self-check; the report's writers (or the table) are trusted: the in-memory bake that recorded them
    checked itself, and checks the table on every family it lists.
    """
    source = Path(model_dir)
    if not source.is_dir():
        raise ConfigError(f"model folder {source} does not exist; pass the folder of a saved checkpoint")
    if not isinstance(report, SRAReport):
        try:
            report = SRAReport.load(report)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"cannot read the report {report}: {err}") from None
    target = check_output_dir(output_dir, overwrite)
    if target.resolve() == source.resolve():
        raise ConfigError("the output folder must differ from the model folder (the bake reads it while writing)")
    ckpt = _Checkpoint(source)
    model = _meta_model(source, report)
    if report.model_type and report.model_type != model.config.model_type:
        raise ConfigError(f"the report is for a {report.model_type!r} model but {source} holds a "
                          f"{model.config.model_type!r} model; pass the report of a run on this model")
    groups = _plan(model, report, ckpt)
    owner = {k: key for key, g in groups.items() for k in g.source.keys}
    with atomic_folder(target, overwrite=overwrite) as tmp:
        pending: dict[str, torch.Tensor] = {}  # edited pieces of a group whose other pieces live in later shards
        for n, shard in enumerate(ckpt.shards):
            out = {}
            with safe_open(str(source / shard), "pt") as f:
                metadata = f.metadata()
                for key in f.keys():
                    if key in owner and key not in pending:
                        pending.update(_edited(groups[owner[key]], ckpt))
                    out[key] = pending.pop(key) if key in owner else f.get_tensor(key)
            save_file(out, str(tmp / shard), metadata=metadata)
            del out
            if progress:
                progress("shard", n + 1, len(ckpt.shards))
        for item in source.iterdir():
            if item.is_file() and not item.name.endswith(_OTHER_WEIGHTS) and item.name != REPORT_NAME:
                shutil.copy2(item, tmp / item.name)
        report.save(tmp / REPORT_NAME)
    return target


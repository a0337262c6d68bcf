"""Bake a direction out of the model's weights: ``W ← W − γ u (uᵀW)`` on every residual-stream writer.

The math runs in fp32 and is cast back to each weight's dtype. For post-norm layers the projection
direction is ``u = normalize(g ⊙ v)``, with g the post-norm gain, so that what reaches the residual
stream has no component along v. Weights that accelerate offloads (``meta`` on the module, real in the
hook's ``weights_map``) are edited where they really live::

    handle = bake_direction(model, direction, strength=1.0)   # every decoder layer
    ...
    handle.undo()                                             # weights back as they were
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .architectures import Writer, decoder_layers, residual_writers
from .errors import ConfigError, UnsupportedModelError
from .profile import StrengthProfile
from .residualize import orthogonalize

Direction = Union[torch.Tensor, Mapping[int, torch.Tensor]]
Strength = Union[float, Mapping, StrengthProfile]


# -- one way to touch a weight ---------------------------------------------------------------------------
def _offload_map(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    return getattr(hook, "weights_map", None) if hook is not None else None


def read_param(module: nn.Module, name: str) -> torch.Tensor:
    """A real fp32 copy of ``module.<name>``, also when accelerate keeps it on ``meta`` and offloads it."""
    param = module._parameters[name]
    if param.device.type == "meta":
        weights_map = _offload_map(module)
        if weights_map is None:
            raise UnsupportedModelError(f"{type(module).__name__}.{name} is on the meta device with no offload map to read from")
        return weights_map[name].detach().to(torch.float32, copy=True)
    return param.detach().to(torch.float32, copy=True)


def write_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into ``module.<name>`` in its own dtype, into the offload store for meta weights."""
    param = module._parameters[name]
    if param.device.type != "meta":
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        return
    weights_map = _offload_map(module)
    stored = weights_map[name]
    new = value.to(dtype=stored.dtype, device=stored.device)
    # The map is a PrefixedDataset over a dict or an OffloadedWeightsLoader; disk-backed entries are
    # re-read on every access, so the edit must replace the entry, not mutate a loaded copy.
    store, key = weights_map, name
    while hasattr(store, "prefix") and hasattr(store, "dataset"):
        store, key = store.dataset, f"{store.prefix}{key}"
    if hasattr(store, "state_dict") and isinstance(store.state_dict, dict):
        store.state_dict[key] = new
    elif isinstance(store, dict):
        store[key] = new
    else:
        raise UnsupportedModelError(f"cannot write into offload store of type {type(store).__name__}")


# -- the projection --------------------------------------------------------------------------------------
def post_norm_gain(norm: nn.Module, hidden: int) -> torch.Tensor:
    """Effective per-channel gain of an RMS-style norm, probed with a constant input (rms = 1).

    Probing covers every gain convention (``w``, ``1 + w``) without knowing the class.
    """
    param = next(iter(norm.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    with torch.no_grad():
        out = norm(torch.ones(1, hidden, dtype=dtype, device=device))
    return out.reshape(-1).to(torch.float32)


def writer_direction(writer: Writer, v: torch.Tensor) -> torch.Tensor:
    """The unit vector ``u`` to project out of this writer so its residual contribution is ⟂ v."""
    v = v.to(torch.float32)
    if writer.post_norm is not None:
        v = post_norm_gain(writer.post_norm, v.numel()).to(v.device) * v
    norm = v.norm()
    if not torch.isfinite(norm) or norm < 1e-12:
        raise ConfigError(f"direction for {writer.name} is zero or not finite")
    return v / norm


def _project_out(t: torch.Tensor, u: torch.Tensor, axis: int, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``t − γ u (uᵀt)`` along ``axis`` and the removed coefficients ``uᵀt`` (kept for undo)."""
    moved = t.movedim(axis, -1)
    coef = moved @ u
    return (moved - strength * coef.unsqueeze(-1) * u).movedim(-1, axis), coef


def _add_back(t: torch.Tensor, u: torch.Tensor, axis: int, strength: float, coef: torch.Tensor) -> torch.Tensor:
    return (t.movedim(axis, -1) + strength * coef.unsqueeze(-1) * u).movedim(-1, axis)


@dataclass
class _Edit:
    writer: Writer
    param: str
    axis: int
    u: torch.Tensor
    coef: torch.Tensor
    strength: float


@dataclass
class BakeHandle:
    """Record of one bake. ``undo()`` adds the removed rank-one parts back (exact up to dtype rounding)."""

    strength: StrengthProfile
    layers: list[int]
    writer_names: list[str]
    _edits: list[_Edit] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        for edit in reversed(self._edits):
            w = read_param(edit.writer.module, edit.param)
            u = edit.u.to(w.device)
            write_param(edit.writer.module, edit.param, _add_back(w, u, edit.axis, edit.strength, edit.coef.to(w.device)))
        self._edits.clear()


def writer_strengths(model: nn.Module, writers: Sequence[Writer], strength: Strength) -> list[float]:
    """γ for each writer under a flat strength or a `StrengthProfile`."""
    profile = StrengthProfile.parse(strength)
    n_layers = len(decoder_layers(model))
    return [profile.gamma(w.layer, n_layers, w.kind) for w in writers]


def _layer_vector(direction: Direction, writer: Writer) -> torch.Tensor:
    if isinstance(direction, Mapping):
        if writer.layer not in direction:
            raise ConfigError(f"direction map has no vector for layer {writer.layer}")
        direction = direction[writer.layer]
    v = torch.as_tensor(direction).detach()
    if v.dim() != 1 or v.numel() != writer.module._parameters[writer.param].shape[writer.hidden_axis]:
        raise ConfigError(f"direction must be a 1-D hidden-size vector, got shape {tuple(v.shape)}")
    return v


def bake_direction(
    model: nn.Module,
    direction: Direction,
    strength: Strength = 1.0,
    layers: Optional[list[int]] = None,
    *,
    orthogonal_to: Sequence[Direction] = (),
) -> BakeHandle:
    """Project ``direction`` out of every attention-out and MLP-down writer (biases and experts included).

    Args:
        model: a transformers causal LM (any device map, offloaded weights included).
        direction: one hidden-size vector for all layers, or ``{layer: vector}`` for per-layer directions.
        strength: γ; 1.0 removes the component completely. A `StrengthProfile` (or its dict) sets γ per
            layer and per writer kind; writers whose γ is 0 are left alone.
        layers: decoder layers to edit; default every layer (or the keys of a direction map).
        orthogonal_to: directions already baked out. Each writer's ``u`` is made orthogonal to theirs, so
            this bake cannot re-introduce them (this matters for post-norm layers, where ``u`` depends on g).

    Returns a `BakeHandle`; ``handle.undo()`` restores the weights. If any writer fails, the writers
    already edited are restored before the error propagates, so the model is never left half-edited.
    """
    profile = StrengthProfile.parse(strength)
    if isinstance(direction, Mapping):
        layers = sorted(int(k) for k in direction) if layers is None else [i for i in layers if i in direction]
    writers = residual_writers(model, layers)
    # Resolve every direction before touching a weight, so bad input never half-edits the model.
    plan = []
    for w, gamma in zip(writers, writer_strengths(model, writers, profile)):
        u = writer_direction(w, _layer_vector(direction, w))
        if orthogonal_to:
            u = orthogonalize(u, [writer_direction(w, _layer_vector(p, w)) for p in orthogonal_to])
        if gamma > 0:
            plan.append((w, u, gamma))

    handle = BakeHandle(profile, sorted({w.layer for w, _, _ in plan}), [w.name for w, _, _ in plan])
    try:
        for w, u, gamma in plan:
            for name, axis in ((w.param, w.hidden_axis), (w.bias, -1)):
                if name is None:
                    continue
                t = read_param(w.module, name)
                u_dev = u.to(t.device)
                new, coef = _project_out(t, u_dev, axis, gamma)
                write_param(w.module, name, new)
                handle._edits.append(_Edit(w, name, axis, u_dev, coef, gamma))
    except BaseException:
        handle.undo()
        raise
    return handle


@contextmanager
def ablate_activations(
    model: nn.Module, direction: Direction, strength: Strength = 1.0, layers: Optional[list[int]] = None
) -> Iterator[None]:
    """Preview of `bake_direction` with hooks: each writer's output loses ``γ u (uᵀy)``; no weight changes.

    Identical to baking up to floating-point rounding, since ``(W − γuuᵀW)x + (b − γuuᵀb) = y − γu(uᵀy)``.
    """
    handles = []

    def make_hook(u: torch.Tensor, strength: float):
        def hook(_module, _args, output):
            y = output[0] if isinstance(output, tuple) else output
            uu = u.to(device=y.device, dtype=torch.float32)
            projected = (y.float() - strength * (y.float() @ uu).unsqueeze(-1) * uu).to(y.dtype)
            return (projected, *output[1:]) if isinstance(output, tuple) else projected

        return hook

    try:
        if isinstance(direction, Mapping) and layers is None:
            layers = sorted(int(k) for k in direction)
        writers = residual_writers(model, layers)
        for w, gamma in zip(writers, writer_strengths(model, writers, strength)):
            if gamma > 0:
                u = writer_direction(w, _layer_vector(direction, w))
                handles.append(w.module.register_forward_hook(make_hook(u, gamma)))
        yield
    finally:
        for h in handles:
            h.remove()


class BakeStack:
    """Bakes that stand or fall together: if the ``with`` block raises, every bake is undone, latest first.

    ::

        with BakeStack(model) as bakes:
            bakes.bake(direction, profile)
            ...                                   # an error here leaves the model as it was
        report_handles = bakes.handles
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.handles: list[BakeHandle] = []
        self.directions: list[torch.Tensor] = []

    def bake(self, direction: torch.Tensor, strength: Strength = 1.0, layers: Optional[list[int]] = None) -> BakeHandle:
        """Bake ``direction`` orthogonal to everything this stack already removed."""
        handle = bake_direction(self.model, direction, strength, layers, orthogonal_to=self.directions)
        self.handles.append(handle)
        self.directions.append(direction)
        return handle

    def undo_last(self) -> None:
        self.handles.pop().undo()
        self.directions.pop()

    def undo_all(self) -> None:
        while self.handles:
            self.undo_last()

    def __enter__(self) -> "BakeStack":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.undo_all()

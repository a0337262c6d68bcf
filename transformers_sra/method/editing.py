"""Bake a direction out of the model's weights: ``W ← W − γ u (uᵀW)`` on every residual-stream writer.

The math runs in fp32 and is cast back to each weight's dtype. For post-norm layers the projection
direction is ``u ∝ Aᵀv``, with A the post-norm's linear part (``g ⊙ v`` for RMSNorm), so that what reaches
the residual stream has no component along v; a post-norm's bias is edited with ``u = v``. Weights that
accelerate offloads (``meta`` on the module, real in the hook's ``weights_map``) are edited where they
really live. Every bake checks itself: each edited layer is run on a recorded random-token input, and if
its residual write (output − input) keeps more than 1e-4 of its size along v, the bake is undone and
`UnsupportedModelError` names the layer and the writers found::

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

from .._torch_utils import first_tensor, project_out, replace_first
from ..errors import ConfigError, UnsupportedModelError
from ..models.architectures import Writer, check_editable, decoder_layers, layer_indices, model_hidden_size, residual_writers
from ..models.probing import (
    LayerCall,
    capture_layer_calls,
    layer_output,
    native_precision,
    norm_transpose,
    still_writing,
    write_ratio,
)
from ..models.weights import read_param, write_param
from ..strength import StrengthProfile
from .residualize import orthogonalize

# The bake's self-check: after the edit, no layer may write more than this share of its write along v
# (fp32 rounding leaves ~1e-6). Offloaded layers run in their own dtype, where bf16 rounding alone is ~1e-2.
INVARIANT_TOL = 1e-4
_NATIVE_TOL = {torch.float32: INVARIANT_TOL, torch.float64: INVARIANT_TOL}

Direction = Union[torch.Tensor, Mapping[int, torch.Tensor]]
Strength = Union[float, Mapping, StrengthProfile]


# -- the projection --------------------------------------------------------------------------------------
def writer_direction(writer: Writer, v: torch.Tensor) -> torch.Tensor:
    """The unit vector ``u`` to project out of this writer so its residual contribution is ⟂ v.

    Behind a post-norm ``N(y) = A y / s(y) + b`` it is ``u ∝ Aᵀ v`` (``g ⊙ v`` for RMSNorm, centred ``g ⊙ v``
    for LayerNorm), found by probing the norm (`probing.norm_transpose`). Behind nested post-norms, innermost
    ``N₁`` to outermost ``Nₖ`` (Gemma-4's MoE branches sit inside its post-feedforward norm), ``u ∝ A₁ᵀ⋯Aₖᵀ v``.
    """
    v = v.to(torch.float32)
    for norm in reversed(writer.post_norms):  # u ∝ A₁ᵀ…Aₖᵀ v: the outermost norm's transpose first
        v = norm_transpose(norm, v).to(v.device)
    norm = v.norm()
    if not torch.isfinite(norm) or norm < 1e-12:
        raise ConfigError(f"direction for {writer.name} is zero or not finite")
    return v / norm


def edit_tensor(t: torch.Tensor, u: torch.Tensor, axis: int, strength: float,
               norm_preserving: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One writer tensor's bake, shared by the in-memory and the streaming bake so both give the same bits:
    ``(new, coef, scale)`` with ``new = t − γ u (uᵀt)``, rescaled per hidden-size vector to its old norm when
    ``norm_preserving`` (``scale`` the factors, else None), and ``coef = uᵀt`` kept for undo."""
    new, coef = project_out(t, u, axis, strength)
    scale = _norm_ratio(t, new, axis) if norm_preserving else None
    return (new if scale is None else new * scale), coef, scale


def _add_back(t: torch.Tensor, u: torch.Tensor, axis: int, strength: float, coef: torch.Tensor) -> torch.Tensor:
    return (t.movedim(axis, -1) + strength * coef.unsqueeze(-1) * u).movedim(-1, axis)


def _norm_ratio(old: torch.Tensor, new: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-vector factors that give each hidden-size vector of ``new`` (along ``axis``) its norm in ``old``."""
    before = old.float().norm(dim=axis, keepdim=True)
    after = new.float().norm(dim=axis, keepdim=True)
    return torch.where(after > 1e-12, before / after.clamp_min(1e-12), torch.ones_like(after))


@dataclass
class _Edit:
    writer: Writer
    param: str
    axis: int
    u: torch.Tensor
    coef: torch.Tensor
    strength: float
    scale: Optional[torch.Tensor] = None  # norm-preserving bake: the per-vector factors applied after projecting


@dataclass
class BakeHandle:
    """Record of one bake. ``undo()`` adds the removed rank-one parts back (exact up to dtype rounding).

    ``invariant`` is the self-check: the largest share of a layer's residual write along v ``before`` and
    ``after`` the bake, over the ``layers_checked`` (empty when the bake ran with ``verify=False``).
    ``storage_rounding`` is the largest |stored − fp32 edit| over the edited weights (0 for fp32 models).
    """

    strength: StrengthProfile
    layers: list[int]
    writer_names: list[str]
    invariant: dict = field(default_factory=dict)
    storage_rounding: float = 0.0
    _edits: list[_Edit] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        for edit in reversed(self._edits):
            w = read_param(edit.writer.module, edit.param)
            if edit.scale is not None:
                w = w / edit.scale.to(w.device)
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


@dataclass
class _Planned:
    writer: Writer
    u: torch.Tensor
    gamma: float
    earlier: list  # this writer's u for each direction already baked out (orthogonal_to)


def plan_writers(model: nn.Module, writers: Sequence[Writer], direction: Direction, strength: Strength = 1.0,
                 orthogonal_to: Sequence[Direction] = ()) -> list[_Planned]:
    """Each writer's ``u`` (made orthogonal to its ``u`` for every earlier direction) and γ; no weight is read
    but the post-norms' (so a meta-device model with real post-norms serves the streaming bake)."""
    planned = []
    for w, gamma in zip(writers, writer_strengths(model, writers, strength)):
        u = writer_direction(w, _layer_vector(direction, w))
        earlier = [writer_direction(w, _layer_vector(p, w)) for p in orthogonal_to]
        planned.append(_Planned(w, orthogonalize(u, earlier) if earlier else u, gamma, earlier))
    return planned


def bake_direction(
    model: nn.Module,
    direction: Direction,
    strength: Strength = 1.0,
    layers: Optional[list[int]] = None,
    *,
    orthogonal_to: Sequence[Direction] = (),
    verify: bool = True,
    norm_preserving: bool = False,
) -> BakeHandle:
    """Project ``direction`` out of every residual-stream writer (attention, MLP, experts, mixers, biases).

    Args:
        model: a transformers decoder-only causal LM (any device map, offloaded weights included).
        direction: one hidden-size vector for all layers, or ``{layer: vector}`` for per-layer directions.
        strength: γ; 1.0 removes the component completely. A `StrengthProfile` (or its dict) sets γ per
            layer and per writer kind; writers whose γ is 0 are left alone.
        layers: decoder layers to edit; default every layer (or the keys of a direction map).
        orthogonal_to: directions already baked out. Each writer's ``u`` is made orthogonal to theirs, so
            this bake cannot re-introduce them (this matters for post-norm layers, where ``u`` depends on g).
        verify: run each edited layer on a random-token probe after the edit and check that its residual
            write has no component along the direction (γ < 1 is completed to γ = 1 for the check); on failure
            undo the bake and raise `UnsupportedModelError`. Costs one forward of a few tokens. Turn off for
            models baked shard by shard.
        norm_preserving: after projecting, rescale each hidden-size vector of every edited weight (what one
            input unit writes to the residual stream) back to its original norm; biases are only projected.
            The component along u stays removed (a rescale cannot bring it back), but the rest grows a
            little, so `ablate_activations` previews this edit only approximately.

    Returns a `BakeHandle`; ``handle.undo()`` restores the weights. If any writer fails, the writers
    already edited are restored before the error propagates, so the model is never left half-edited.
    """
    profile = StrengthProfile.parse(strength)
    if isinstance(direction, Mapping):
        layers = sorted(int(k) for k in direction) if layers is None else [i for i in layers if i in direction]
    check_editable(model)
    calls = capture_layer_calls(model, decoder_layers(model), layer_indices(model, layers), model_hidden_size(model)) \
        if verify and layer_indices(model, layers) else None
    writers = residual_writers(model, layers, calls=calls)
    # Resolve every direction before touching a weight, so bad input never half-edits the model.
    planned = plan_writers(model, writers, direction, profile, orthogonal_to)
    plan = [p for p in planned if p.gamma > 0]

    handle = BakeHandle(profile, sorted({p.writer.layer for p in plan}), [p.writer.name for p in plan])
    try:
        for p in plan:
            w = p.writer
            for name, axis in ((w.param, w.hidden_axis), (w.bias, -1)):
                if name is None:
                    continue
                t = read_param(w.module, name)
                u_dev = p.u.to(t.device)
                new, coef, scale = edit_tensor(t, u_dev, axis, p.gamma, norm_preserving and name == w.param)
                rounding = write_param(w.module, name, new)
                handle.storage_rounding = max(handle.storage_rounding, rounding)
                handle._edits.append(_Edit(w, name, axis, u_dev, coef, p.gamma, scale))
        if calls is not None:
            handle.invariant = _verify(model, planned, handle.layers, calls, direction)
    except BaseException:
        handle.undo()
        raise
    return handle


def _completion_hook(p: _Planned):
    """Forward hook that finishes this writer's edit to γ = 1 for every direction baked so far (check only)."""
    basis = torch.linalg.qr(torch.stack([p.u] + p.earlier, dim=1))[0]  # (hidden, k), orthonormal
    bias = read_param(p.writer.module, p.writer.param) if p.writer.constant else None

    def hook(_module, _args, output):
        y = first_tensor(output)
        b = basis.to(device=y.device, dtype=y.dtype)
        source = bias.to(device=y.device, dtype=y.dtype) if bias is not None else y
        return replace_first(output, y - (source @ b) @ b.T)

    return hook


def _post_norm_note(writer: Writer) -> str:
    names = " then ".join(type(n).__name__ for n in writer.post_norms)
    return f" (post-norm {names})" if names else ""


def _check_failure(i: int, ratio: float, tol: float, mine: list[_Planned], layer: nn.Module, prefix: str,
                   culprits: list) -> str:
    """What the self-check says when it fails: which module still writes along v, and what to send to get it fixed."""
    found = ", ".join(sorted({p.writer.name + _post_norm_note(p.writer) for p in mine}))
    where = (f"still written along it by {', '.join(f'{prefix}.{c}' for c in culprits)} (made ⟂ v, their output "
             "would leave the layer's write ⟂ v)" if culprits else "no few modules' outputs account for it")
    return (f"bake check failed in decoder layer {i} ({type(layer).__name__}): after the edit its residual write still "
            f"has {ratio:.1e} of its size along the direction (limit {tol:g}), {where}; writers edited: {found}. The bake "
            "was undone. The layer writes to the residual stream through something these rank-one edits cannot reach (a "
            "writer or post-norm that was missed, a norm over the residual stream itself, or a wrong LAYOUTS entry). "
            "Please report it with this message, the model's config.json (or its Hub id) and the versions of "
            "transformers and transformers-sra")


def _verify(model: nn.Module, planned: list[_Planned], layers: list[int], calls: dict[int, LayerCall],
            direction: Direction) -> dict:
    """The bake's self-check on each edited layer (see `bake_direction`); returns the invariant record."""
    blocks = decoder_layers(model)
    before, after = 0.0, 0.0
    for i in layers:
        mine = [p for p in planned if p.writer.layer == i]
        v = _layer_vector(direction, mine[0].writer).to(torch.float32)
        v = v / v.norm()
        call = calls[i]
        before = max(before, write_ratio(call.out.float() - call.x.float(), v))
        dtype = next(blocks[i].parameters()).dtype
        # bf16/fp16 weights hold the edit only up to their own rounding, which leaves ~eps/√d along v
        stored = max(INVARIANT_TOL, torch.finfo(dtype).eps / 2) if dtype.is_floating_point else INVARIANT_TOL
        tol = _NATIVE_TOL.get(dtype, 2e-2) if native_precision(blocks[i]) else stored
        hooks = [p.writer.output_module.register_forward_hook(_completion_hook(p)) for p in mine if p.gamma != 1 or p.earlier]
        try:
            with torch.no_grad():
                ratio = write_ratio(layer_output(blocks[i], call) - call.x.float(), v)
                culprits = still_writing(blocks[i], call, v, tol) if not ratio <= tol else []
        finally:
            for h in hooks:
                h.remove()
        after = max(after, ratio)
        if not ratio <= tol:
            names = {id(m): n for n, m in model.named_modules()}
            raise UnsupportedModelError(_check_failure(i, ratio, tol, mine, blocks[i], names[id(blocks[i])], culprits))
    return {"before": before, "after": after, "layers_checked": len(layers), "tolerance": INVARIANT_TOL}


@contextmanager
def ablate_activations(
    model: nn.Module, direction: Direction, strength: Strength = 1.0, layers: Optional[list[int]] = None
) -> Iterator[None]:
    """Preview of `bake_direction` with hooks: each writer's output loses ``γ u (uᵀy)``; no weight changes.

    Identical to baking up to floating-point rounding, since ``(W − γuuᵀW)x + (b − γuuᵀb) = y − γu(uᵀy)``.
    """
    handles = []

    def make_hook(u: torch.Tensor, strength: float, constant: Optional[torch.Tensor]):
        def hook(_module, _args, output):
            y = first_tensor(output)
            uu = u.to(device=y.device, dtype=torch.float32)
            # A post-norm's bias is the same vector at every token: remove its component, not the norm output's.
            source = y.float() if constant is None else constant.to(y.device)
            projected = (y.float() - strength * (source @ uu).unsqueeze(-1) * uu).to(y.dtype)
            return replace_first(output, projected)

        return hook

    try:
        if isinstance(direction, Mapping) and layers is None:
            layers = sorted(int(k) for k in direction)
        writers = residual_writers(model, layers)
        for w, gamma in zip(writers, writer_strengths(model, writers, strength)):
            if gamma > 0:
                u = writer_direction(w, _layer_vector(direction, w))
                constant = read_param(w.module, w.param) if w.constant else None
                handles.append(w.output_module.register_forward_hook(make_hook(u, gamma, constant)))
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

    def __init__(self, model: nn.Module, verify: bool = True, norm_preserving: bool = False) -> None:
        self.model = model
        self.verify = verify
        self.norm_preserving = norm_preserving
        self.handles: list[BakeHandle] = []
        self.directions: list[torch.Tensor] = []

    def bake(self, direction: torch.Tensor, strength: Strength = 1.0, layers: Optional[list[int]] = None) -> BakeHandle:
        """Bake ``direction`` orthogonal to everything this stack already removed."""
        handle = bake_direction(self.model, direction, strength, layers, orthogonal_to=self.directions,
                                verify=self.verify, norm_preserving=self.norm_preserving)
        self.handles.append(handle)
        self.directions.append(direction)
        return handle

    @property
    def invariant(self) -> dict:
        """The self-checks of every bake in the stack: largest residual share along v before and after."""
        checks = [h.invariant for h in self.handles if h.invariant]
        rounding = {"storage_rounding": max((h.storage_rounding for h in self.handles), default=0.0)}
        if not checks:
            return rounding if self.handles else {}
        return {"before": max(c["before"] for c in checks), "after": max(c["after"] for c in checks),
                "bakes_checked": len(checks), "tolerance": INVARIANT_TOL, **rounding}

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


def reapply_edit(model: nn.Module, report) -> list:
    """Bake the report's directions into ``model`` (the unedited base) again, as the pipeline did: the first
    with the report's strength profile, each accepted mining pass with its flat γ, each orthogonal to the
    earlier ones. Returns the handles and makes the report live again (``report.undo()`` works)."""
    layers = report.config.get("layers")
    bakes = report.bakes()
    directions = [d for d, _ in bakes]
    norm_preserving = bool(report.config.get("norm_preserving", False))
    report.attach([bake_direction(model, d, strength, layers, orthogonal_to=directions[:i],
                                  norm_preserving=norm_preserving)
                   for i, (d, strength) in enumerate(bakes)])
    return report.handles

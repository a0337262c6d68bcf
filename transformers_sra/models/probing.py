"""Writer discovery by probing: which tensors of a decoder layer write into the residual stream, read off the
data flow of the layer itself, whatever its family calls them.

A layer computes ``out = x + Σ_k c_k · N_k(y_k)``: each writer's output ``y_k`` (a linear map, a Conv1D, a fused
expert tensor in any axis order, a Mamba or linear-attention ``out_proj``) reaches the residual add either
directly (``N_k`` the identity; ``c_k`` a per-token scalar such as a routing weight, gate or residual multiplier)
or through a post-sublayer norm ``N_k``. Both are found by perturbation: a module's output is shifted by a
constant vector ``d``; if the layer's write then moves by a per-token multiple of ``d``, that module's output is
added to the residual stream as it is. While one module is shifted, every other module with a weight matrix
replays its clean output, so later sublayers that read the stream do not blur the test. A linear module whose
output is added is a writer; a norm-like module (no matrix parameters) whose output is added and whose input
moves by a multiple of ``d`` when a linear module's output does, is that module's post-norm; a norm whose output
only moves the input of such a norm sits inside it, and the writer's post-norms are the chain (Gemma-4's MoE
branches are each normed, summed and normed again). Each layer kind of a hybrid stack is probed on its own.

Post-norm gains come from the norm's transpose, ``u ∝ Aᵀ v``, probed with one-hot inputs (see `norm_transpose`):
that holds for RMSNorm (any gain convention) and for LayerNorm, whose centring a constant probe would zero out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call

from .._torch_utils import first_tensor, project_out, replace_first, text_config
from ..errors import UnsupportedModelError
from .weights import read_param

# Path segments that mark a writer as the token mixer ("attn") or the channel mixer ("mlp"); strength profiles
# scale the two kinds apart. Mamba mixers and linear attention count as attention: they mix tokens.
_ATTN_WORDS = ("attn", "attention", "mixer", "mamba", "ssm", "time_mix", "token_mix", "temporal", "recurrent",
               "linear_attn", "conv", "rwkv", "retention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "expert", "moe", "channel_mix", "dense_4h", "fc", "down_proj")
_ATTENTION_PARENTS = ("attn", "attention")  # unlike a hybrid's generic "mixer", these never hold the MLP
_PARALLEL_TOL = 1e-3  # a perturbation response counts as "along d" within this relative residual (fp32 rounding)
_PERP_TOL = 1e-4


@dataclass(frozen=True)
class WriterSpec:
    """One residual writer, relative to its decoder layer (module paths without the layer's prefix)."""

    path: str
    param: str
    hidden_axis: int
    bias: Optional[str]
    post_norms: tuple[str, ...]  # norms between the writer and the residual add, innermost first (Gemma-4's MoE nests two)
    kind: str
    constant: bool = False  # a post-norm's bias: the same vector added at every token
    carrier: Optional[str] = None  # for a vector whose own module is never called: the module whose output adds it


@dataclass
class LayerCall:
    """One recorded call of a decoder layer: its inputs and its (pre-bake) output hidden states."""

    args: tuple
    kwargs: dict
    hidden_key: Any  # int position in args or str key in kwargs of the input hidden states
    x: torch.Tensor
    out: torch.Tensor


# -- running one layer -----------------------------------------------------------------------------------
def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(o, fn) for k, o in obj.items()}
    return obj


def _is_offloaded(module: nn.Module) -> bool:
    return any(hasattr(m, "_hf_hook") for m in module.modules()) or any(p.device.type == "meta" for p in module.parameters())


def native_precision(module: nn.Module) -> bool:
    """True when `run_fp32` must run the module in its own dtype (accelerate-offloaded weights)."""
    return _is_offloaded(module)


def run_fp32(module: nn.Module, args: tuple, kwargs: dict, overrides: Optional[dict] = None):
    """Call ``module`` with fp32 copies of its weights and floating inputs, so checks are not blurred by bf16.

    ``overrides`` replaces named parameters for this call only. Offloaded modules run as they are.
    """
    up = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
    if _is_offloaded(module):
        if overrides:  # accelerate's hook would load the stored weights over the trial ones
            raise UnsupportedModelError(f"cannot try trial weights in offloaded {type(module).__name__}")
        return module(*args, **kwargs)
    state = {}
    if overrides or any(t.is_floating_point() and t.dtype != torch.float32
                        for t in list(module.parameters()) + list(module.buffers())):
        state = {n: up(t.detach()) for n, t in list(module.named_parameters()) + list(module.named_buffers())}
    state.update(overrides or {})
    if not state:
        return module(*args, **kwargs)
    return functional_call(module, state, _map_tensors(args, up), _map_tensors(kwargs, up), strict=False)


def layer_output(layer: nn.Module, call: LayerCall, overrides: Optional[dict] = None,
                 x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's output hidden states on ``call`` (fp32), optionally with other parameters or another input."""
    args, kwargs = call.args, call.kwargs
    if x is not None and isinstance(call.hidden_key, int):
        args = (x, *args[1:])
    elif x is not None:
        kwargs = {**kwargs, call.hidden_key: x}
    out = first_tensor(run_fp32(layer, args, kwargs, overrides))
    if out is None or out.shape != call.x.shape:
        raise UnsupportedModelError(f"decoder layer {type(layer).__name__} does not return hidden states shaped like its input")
    return out


class _Stop(Exception):
    pass


def capture_layer_calls(model: nn.Module, blocks: nn.ModuleList, indices: list[int], hidden: int,
                        n_tokens: int = 6, seed: int = 0) -> dict[int, LayerCall]:
    """Run the model once on a few random tokens and record the inputs and output of each chosen layer."""
    calls: dict[int, LayerCall] = {}
    wanted = set(indices)
    last = max(wanted)

    def make_hook(i):
        def hook(_module, args, kwargs, output):
            key = 0 if args and isinstance(args[0], torch.Tensor) else "hidden_states"
            x = args[0] if key == 0 else kwargs.get("hidden_states")
            out = first_tensor(output)
            if not isinstance(x, torch.Tensor) or x.shape[-1] != hidden or out is None:
                raise UnsupportedModelError(f"cannot find the hidden-state input of decoder layer {i} ({type(_module).__name__})")
            calls[i] = LayerCall(tuple(args), dict(kwargs), key, x.detach(), out.detach())
            if i == last:
                raise _Stop

        return hook

    vocab = int(getattr(text_config(model), "vocab_size", None) or 100)
    ids = torch.randint(3, max(4, min(vocab, 1000)), (2, n_tokens), generator=torch.Generator().manual_seed(seed))
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        ids = ids.to(weight.device)
    handles = [blocks[i].register_forward_hook(make_hook(i), with_kwargs=True) for i in wanted]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    except UnsupportedModelError:
        raise
    except Exception as err:  # any forward failure means we cannot check this model: say so, edit nothing
        raise UnsupportedModelError(f"cannot run {type(model).__name__} on token ids to probe its layers: {err}") from None
    finally:
        for h in handles:
            h.remove()
    missing = wanted - set(calls)
    if missing:
        raise UnsupportedModelError(f"decoder layers {sorted(missing)} were not called in a forward pass of "
                                    f"{type(model).__name__}")
    return calls


# -- post-norm transpose -----------------------------------------------------------------------------------
def norm_transpose(norm: nn.Module, v: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``Aᵀ v`` for a per-token norm ``N(y) = A y / s(y) + b`` (s a permutation-symmetric scale).

    Row k of A is ``(N(e_k) − N(−e_k)) / 2`` up to the common factor s(e_k), which normalisation drops. This is
    ``g ⊙ v`` for RMSNorm (``w`` or ``1 + w`` gains alike) and ``centre(g ⊙ v)`` for LayerNorm, whose input
    centring a constant probe would map to zero. A writer whose output is ⟂ ``Aᵀv`` makes ``N``'s output ⟂ v
    apart from the bias b, which is edited as its own (constant) writer.
    """
    v = v.to(torch.float32).cpu()
    hidden = v.numel()
    rows = []
    with torch.no_grad():
        for start in range(0, hidden, chunk):
            eye = torch.eye(hidden, dtype=torch.float32)[start:start + chunk].unsqueeze(0)
            plus = first_tensor(run_fp32(norm, (eye,), {}))
            minus = first_tensor(run_fp32(norm, (-eye,), {}))
            rows.append(((plus - minus).float().cpu()[0] / 2) @ v)
    return torch.cat(rows)


# -- probing -------------------------------------------------------------------------------------------------
def _hidden_axes(t: torch.Tensor, hidden: int) -> list[int]:
    return [a for a in range(t.dim()) if t.shape[a] == hidden]


def _is_linear_like(module: nn.Module, hidden: int) -> bool:
    return any(p is not None and p.dim() >= 2 and p.is_floating_point() and _hidden_axes(p, hidden)
               for p in module._parameters.values())


def is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight (in, out); matched by name to avoid importing it.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _along(delta: torch.Tensor, d: torch.Tensor) -> bool:
    """Every (non-negligible) row of ``delta`` is a multiple of ``d``, and some row is not zero."""
    rows = delta.reshape(-1, d.numel()).double()
    norms = rows.norm(dim=1)
    if not torch.isfinite(norms).all() or norms.max() <= 1e-6 * float(d.norm()):
        return False
    rows = rows[norms > 1e-4 * norms.max()]
    dh = (d / d.norm()).double().to(rows.device)
    resid = rows - (rows @ dh).unsqueeze(1) * dh
    return bool((resid.norm(dim=1) <= _PARALLEL_TOL * rows.norm(dim=1)).all())


def _perpendicular(out: torch.Tensor, u: torch.Tensor) -> bool:
    rows = out.reshape(-1, u.numel()).double()
    norms = rows.norm(dim=1)
    keep = norms > 1e-6 * norms.max()
    return bool(((rows[keep] @ u.double().to(rows.device)).abs() <= _PERP_TOL * norms[keep]).all())


def kind_of(path: str, modules: Optional[dict] = None) -> Optional[str]:
    """"attn" or "mlp" from the innermost path segment (or its module's class) that names a token or channel
    mixer; None if none does. Innermost first, so a hybrid's ``mixer.experts`` is "mlp" and ``mixer.out_proj`` "attn"."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        sub = ".".join(parts[:end])
        # Class names only for containers: a leaf's class says how it computes (Linear, Conv1D), not its role.
        cls = type(modules[sub]).__name__.lower() if modules and sub in modules and end < len(parts) else ""
        for word in (parts[end - 1].lower(), cls):
            if any(w in word for w in _MLP_WORDS):
                # Experts inside an attention block are attention experts (JetMoE's mixture of attention heads).
                outer = [p.lower() for p in parts[:end - 1]]
                return "attn" if any(w in p for p in outer for w in _ATTENTION_PARENTS) else "mlp"
            if any(w in word for w in _ATTN_WORDS):
                return "attn"
    return None


class _Recorder:
    """Forward hooks on every submodule of a layer: inputs and outputs of each call, optional output shifts."""

    def __init__(self, layer: nn.Module):
        self.modules = dict(layer.named_modules())
        self.calls: dict[str, list] = {}
        self.shift: dict[str, torch.Tensor] = {}
        self.freeze: dict[str, list] = {}  # module -> its clean outputs, replayed call by call

    def __enter__(self):
        def make(name):
            def hook(_module, args, kwargs, output):
                out = first_tensor(output)
                if name in self.freeze and out is not None:
                    out = self.freeze[name][len(self.calls.get(name, []))].clone()
                    output = replace_first(output, out)
                if name in self.shift and out is not None:
                    out = out + self.shift[name].to(out.dtype)
                    output = replace_first(output, out)
                # Cloned: some families add into a sublayer's output in place (Llama 4's shared expert).
                self.calls.setdefault(name, []).append((args, kwargs, None if out is None else out.clone()))
                return output

            return hook

        self.handles = [m.register_forward_hook(make(n), with_kwargs=True) for n, m in self.modules.items() if n]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def input_of(self, name: str) -> Optional[torch.Tensor]:
        calls = self.calls.get(name, [])
        if len(calls) != 1:
            return None
        args, kwargs, _ = calls[0]
        if args:
            return first_tensor(args)
        return next((t for t in kwargs.values() if isinstance(t, torch.Tensor)), None)


def _single_input(call) -> bool:
    args, kwargs, _ = call
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    return len(tensors) == 1


def _record(layer: nn.Module, call: LayerCall, shift: Optional[dict] = None, freeze: Optional[dict] = None,
            overrides: Optional[dict] = None, x: Optional[torch.Tensor] = None) -> tuple[_Recorder, torch.Tensor]:
    with torch.no_grad(), _Recorder(layer) as rec:
        rec.shift, rec.freeze = shift or {}, freeze or {}
        out = layer_output(layer, call, overrides, x)
    return rec, out


def _writer_param(layer: nn.Module, call: LayerCall, name: str, outputs: list, hidden: int,
                  seed: int) -> Optional[tuple[str, int, Optional[str]]]:
    """(param, hidden axis, bias) of module ``name`` whose output is a writer: the tensor whose rank-one edit along
    that axis makes every output of the module ⟂ a random u. Linear and Conv1D are read off; anything else (fused
    experts in either axis order, DBRX's flattened 2-D ``w2`` that looks like its input-side ``w1``, custom
    projections) is found by trying each hidden-size axis in a forward pass of the whole layer, so weights that a
    parent slices and passes in as arguments count too."""
    module = layer.get_submodule(name)
    if isinstance(module, nn.Linear) or is_conv1d(module):
        axis = 1 if is_conv1d(module) else 0
        if module.weight.shape[axis] != hidden:
            return None
        return "weight", axis, "bias" if getattr(module, "bias", None) is not None else None
    clean_out = torch.cat([o.reshape(-1, hidden).float() for o in outputs])
    # A test direction the output still has a component along (a model already baked along u would pass any edit).
    gen = torch.Generator().manual_seed(seed + 7919)
    for _ in range(5):
        u = torch.randn(hidden, generator=gen)
        u = u / u.norm()
        if not _perpendicular(clean_out, u):
            break
    else:
        return None  # the module writes nothing on the probe: it cannot be told apart
    params = {n: p for n, p in module._parameters.items() if p is not None and p.is_floating_point()}
    weights = sorted(((n, a) for n, p in params.items() if p.dim() >= 2 for a in _hidden_axes(p, hidden)),
                     key=lambda na: (-params[na[0]].dim(), -params[na[0]].numel()))

    def perp_after(edit: dict[str, int]) -> bool:
        overrides = {f"{name}.{n}": project_out(read_param(module, n), u.to(params[n].device), a)[0]
                     for n, a in edit.items()}
        rec, _ = _record(layer, call, overrides=overrides)
        outs = [o for _, _, o in rec.calls.get(name, [])]
        return bool(outs) and all(o is not None and o.shape[-1] == hidden and _perpendicular(o, u) for o in outs)

    for pname, axis in weights:
        # A bias has one axis fewer than its weight (a vector, or one per expert) and the hidden size last.
        biases = [n for n, p in params.items() if p.dim() == params[pname].dim() - 1 and p.shape[-1] == hidden]
        if not perp_after({pname: axis, **{b: params[b].dim() - 1 for b in biases}}):
            continue
        needed = [b for b in biases if not perp_after({pname: axis, **{c: params[c].dim() - 1 for c in biases if c != b}})]
        if len(needed) > 1:
            return None
        return pname, axis, (needed[0] if needed else None)
    return None


def probe_layer(layer: nn.Module, call: LayerCall, hidden: int, seed: int = 0) -> list[WriterSpec]:
    """The residual writers of one decoder layer, found from its data flow on the recorded call."""
    if _is_offloaded(layer):  # trial weights cannot be swapped in under accelerate's hooks
        raise UnsupportedModelError(
            f"cannot probe the writers of offloaded {type(layer).__name__}: load the model on one device to bake a "
            "family that has no entry in transformers_sra.models.architectures.LAYOUTS, or add one")
    clean, base = _record(layer, call)
    modules = clean.modules
    subtree_linear = {n: any(_is_linear_like(m, hidden) for m in mod.modules()) for n, mod in modules.items()}
    candidates = [n for n, calls in clean.calls.items()
                  if all(o is not None and o.is_floating_point() and o.shape[-1] == hidden for _, _, o in calls)]
    linear = [n for n in candidates if _is_linear_like(modules[n], hidden)]
    matrix = [n for n in clean.calls if any(p is not None and p.dim() >= 2 for p in modules[n]._parameters.values())
              and all(o is not None for _, _, o in clean.calls[n])]
    # Post-norm candidates: no weight matrix below them, and called on one tensor alone (so they can be probed).
    norms = [n for n in candidates if not subtree_linear[n] and clean.input_of(n) is not None
             and _single_input(clean.calls[n][0])]
    gen = torch.Generator().manual_seed(seed)

    direct, feeds, order = {}, {}, {n: i for i, n in enumerate(clean.calls)}
    for name in candidates:
        outs = torch.cat([o.reshape(-1, hidden).float() for _, _, o in clean.calls[name] if o is not None])
        d = torch.randn(hidden, generator=gen)
        d = d / d.norm() * max(float(outs.norm(dim=1).mean()), 1e-2)
        # Every other module with a weight matrix replays its clean output, so the shift reaches the layer's write only along
        # the direct path (through norms, gates, scalars), not through later sublayers that read the stream.
        freeze = {n: [o for _, _, o in clean.calls[n]] for n in matrix
                  if n != name and not n.startswith(name + ".") and not name.startswith(n + ".")}
        rec, out = _record(layer, call, {name: d.to(outs.device)}, freeze)
        direct[name] = _along(out - base, d)
        feeds[name] = set()
        for n in norms:
            moved, before = rec.input_of(n), clean.input_of(n)
            if n != name and moved is not None and moved.shape == before.shape and _along(moved - before, d):
                feeds[name].add(n)

    def path_to_stream(name: str, fed: set, seen: tuple = ()) -> Optional[tuple[str, ...]]:
        """The post-norms from a module whose output moves the inputs of the norms ``fed`` to the residual add,
        innermost first: the shortest chain of norms, each fed by the one before, the last added as it is."""
        chains = []
        for n in fed:
            if n in seen or len(seen) >= 3 or n.startswith(name + ".") or name.startswith(n + "."):
                continue
            rest = () if direct[n] else path_to_stream(n, feeds[n], seen + (n,))
            if rest is not None:
                chains.append((n,) + rest)
        # Fewest norms first; then a norm with a gain, then the first to run (the writer's own post-norm).
        return min(chains, key=lambda c: (len(c), next(modules[c[0]].parameters(), None) is None, order[c[0]]),
                   default=None)

    specs = []
    for name in linear:
        posts = () if direct[name] else path_to_stream(name, feeds[name])
        if posts is None:
            continue
        found = _writer_param(layer, call, name, [o for _, _, o in clean.calls[name]], hidden, seed)
        if found is not None:
            specs.append(WriterSpec(name, *found, posts, kind_of(name, modules) or ""))
    specs = _assign_kinds(specs, order)
    frozen = {n: [o for _, _, o in clean.calls[n]] for n in matrix}
    _check_residual_passthrough(layer, call, base, frozen, gen)
    return specs + _constant_writers(layer, call, clean, base, frozen, norms, specs, hidden, gen, path_to_stream)


def _check_residual_passthrough(layer, call, base, frozen, gen) -> None:
    """Refuse a layer that normalizes or rescales the residual stream it passes on (post-LN, scaled residuals):
    there the write ``out − x`` depends on x itself, along v too, and no edit of the writers can remove that."""
    d = torch.randn(call.x.shape[-1], generator=gen)
    d = d / d.norm() * float(call.x.float().norm(dim=-1).mean())
    _, out = _record(layer, call, freeze=frozen, x=call.x.float() + d.to(call.x.device))
    moved = (out - base).reshape(-1, d.numel()) - d.to(out.device)
    if not float(moved.norm(dim=1).max()) <= _PARALLEL_TOL * float(d.norm()):
        raise UnsupportedModelError(
            f"decoder layer {type(layer).__name__} normalizes or rescales the residual stream it passes on (post-LN or a "
            "scaled residual), so its write depends on the direction in a way no rank-one edit of weights can remove")


def _constant_writers(layer, call, clean, base, frozen, norms, specs, hidden, gen, path_to_stream) -> list[WriterSpec]:
    """Vectors added at every token: a post-norm's bias, a bias an MoE block adds to its output. Each hidden-size
    vector parameter not already a writer's bias is shifted by d; if the write (or a post-norm's input) moves by
    multiples of d, that vector is a writer of its own. Its module need not be called: JetMoE's attention experts
    add their bare ``bias`` in a helper method (``reduce``) that the attention calls."""
    covered = {f"{s.path}.{s.bias}" for s in specs if s.bias} | {f"{s.path}.{s.param}" for s in specs}
    found = []
    for pname, p in layer.named_parameters():
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        if p.dim() != 1 or p.numel() != hidden or pname in covered or not owner:
            continue
        d = torch.randn(hidden, generator=gen)
        d = d / d.norm() * max(float(p.detach().float().norm()), 1.0)
        current = read_param(layer.get_submodule(owner), pname.rsplit(".", 1)[-1]).to(p.device)
        rec, out = _record(layer, call, freeze=frozen, overrides={pname: current + d.to(p.device)})
        posts: Optional[tuple] = ()
        if not _along(out - base, d):
            fed = {n for n in norms if n != owner and rec.input_of(n) is not None
                   and rec.input_of(n).shape == clean.input_of(n).shape and _along(rec.input_of(n) - clean.input_of(n), d)}
            posts = path_to_stream(owner, fed)
            if posts is None:
                continue
        kind = kind_of(owner, clean.modules) or next(
            (s.kind for s in specs if s.post_norms and s.post_norms[0] in (owner, *posts[:1])), "mlp")
        # Hooks that act on the write (the self-check's completion, the activation preview) go on the innermost
        # called module around the vector when its own module is never called.
        carrier = None if owner in clean.calls else next(
            (a for a in (owner.rsplit(".", k)[0] for k in range(1, owner.count(".") + 1)) if a in clean.calls), None)
        found.append(WriterSpec(owner, pname.rsplit(".", 1)[-1], 0, None, posts, kind, constant=True, carrier=carrier))
    return found


def _assign_kinds(specs: list[WriterSpec], order: dict[str, int]) -> list[WriterSpec]:
    """Writers whose names say nothing: the first to run in the layer mixes tokens ("attn"), later ones "mlp"."""
    out = []
    first = min((order[s.path] for s in specs), default=0)
    for s in specs:
        kind = s.kind or ("attn" if order[s.path] == first and len(specs) > 1 else "mlp")
        out.append(WriterSpec(s.path, s.param, s.hidden_axis, s.bias, s.post_norms, kind, s.constant, s.carrier))
    return out


def layer_signature(layer: nn.Module) -> tuple:
    """Layers with equal signatures have the same writers (one probe serves every layer of a kind)."""
    return tuple((n, type(m).__name__, tuple((p, tuple(t.shape)) for p, t in m._parameters.items() if t is not None))
                 for n, m in layer.named_modules())


# -- the invariant -------------------------------------------------------------------------------------------
def still_writing(layer: nn.Module, call: LayerCall, v: torch.Tensor, tol: float, most: int = 4) -> list[str]:
    """Where a failed bake's residual component along v comes from (missed writers, or their post-norms): the
    fewest modules of ``layer`` (up to ``most``, chosen greedily, the innermost among equals) whose outputs, made
    ⟂ v together, leave the layer's write ⟂ v within ``tol``; empty if no such few modules do."""
    clean, _ = _record(layer, call)
    hidden = v.numel()
    candidates = [n for n, calls in clean.calls.items()
                  if all(o is not None and o.is_floating_point() and o.shape[-1] == hidden for _, _, o in calls)]

    def perp(_module, _args, output):
        y = first_tensor(output)
        vv = v.to(device=y.device, dtype=y.dtype)
        return replace_first(output, y - (y @ vv).unsqueeze(-1) * vv)

    def ratio_without(names: list[str]) -> float:
        handles = [layer.get_submodule(n).register_forward_hook(perp) for n in names]
        try:
            with torch.no_grad():
                return write_ratio(layer_output(layer, call) - call.x.float(), v)
        finally:
            for h in handles:
                h.remove()

    chosen: list[str] = []
    for _ in range(most):
        ratios = {n: ratio_without(chosen + [n]) for n in candidates if n not in chosen}
        if not ratios:
            break
        best = min(ratios, key=lambda n: (ratios[n] > tol, ratios[n] if ratios[n] > tol else 0.0, -n.count(".")))
        chosen.append(best)
        if ratios[best] <= tol:
            return chosen
    return []


def write_ratio(write: torch.Tensor, v: torch.Tensor) -> float:
    """max over tokens of |⟨write, v⟩| / |write|: how much of the layer's residual write lies along unit v."""
    rows = write.reshape(-1, v.numel()).double()
    norms = rows.norm(dim=1).clamp_min(1e-30)
    return float(((rows @ v.double().to(rows.device)).abs() / norms).max())

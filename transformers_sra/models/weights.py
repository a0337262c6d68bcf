"""One way to touch a weight: a real fp32 copy of a parameter wherever it lives, and the write back.

Weights that accelerate offloads (``meta`` on the module, real in the hook's ``weights_map``) are read and
written where they really live, so baking, undo and probing handle offload once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError


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


def write_param(module: nn.Module, name: str, value: torch.Tensor) -> float:
    """Write ``value`` into ``module.<name>`` in its own dtype, into the offload store for meta weights.

    Returns the storage rounding: max |stored − value| (0 for fp32 weights, about eps·|w| for bf16/fp16).
    """
    param = module._parameters[name]
    if param.device.type != "meta":
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        return _rounding(param, value)
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
    return _rounding(new, value)


def _rounding(stored: torch.Tensor, value: torch.Tensor) -> float:
    if stored.dtype == value.dtype:
        return 0.0
    return float((stored.detach().to(value.device, torch.float32) - value.float()).abs().max()) if value.numel() else 0.0

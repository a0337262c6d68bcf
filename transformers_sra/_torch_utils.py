"""Model plumbing that several layers need, written once: layer outputs that may be tuples, the decoder
stack without the LM head, the text config of multimodal wrappers, the BOS rule, and the projection."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def first_tensor(output) -> Optional[torch.Tensor]:
    """The hidden states of a module's output: the output itself, or the first item of a tuple/list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def replace_first(output, new: torch.Tensor):
    """``output`` with its hidden states replaced by ``new`` (what a forward hook returns)."""
    if isinstance(output, torch.Tensor):
        return new
    return type(output)([new, *output[1:]]) if isinstance(output, list) else (new, *output[1:])


def get_decoder(model: nn.Module) -> Optional[nn.Module]:
    """``model.get_decoder()`` where the model has a working one, else None."""
    method = getattr(model, "get_decoder", None)
    try:
        return method() if callable(method) else None
    except (AttributeError, NotImplementedError):
        return None


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head; falls back to ``base_model`` (or the model) for unusual wrappers."""
    decoder = get_decoder(model)
    return decoder if decoder is not None and decoder is not model else getattr(model, "base_model", model)


def text_config(model_or_config):
    """The text decoder's config (multimodal configs nest it); accepts a model or a config."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def adds_special_tokens(tokenizer) -> bool:
    """Whether tokenizing a formatted prompt should add BOS: a chat template already holds the special tokens it
    needs, and a second BOS would shift every activation."""
    return not getattr(tokenizer, "chat_template", None)


def project_out(t: torch.Tensor, u: torch.Tensor, axis: int = -1, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``t − γ u (uᵀt)`` along ``axis`` (u a unit vector), and the removed coefficients ``uᵀt``."""
    moved = t.movedim(axis, -1)
    coef = moved @ u
    return (moved - strength * coef.unsqueeze(-1) * u).movedim(-1, axis), coef

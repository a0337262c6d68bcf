"""Tokenize prompts into length-sorted, left-padded batches with correct position ids.

Sorting by length keeps padding (and wasted compute) small; left padding puts every prompt's last token
at position -1; explicit position ids make padded rows compute exactly what they would alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn


@dataclass
class Batch:
    indices: list[int]  # positions of these rows in the caller's prompt list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def model_inputs(self, model: nn.Module) -> dict:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if "position_ids" in inspect.signature(model.forward).parameters:
            inputs["position_ids"] = self.position_ids
        return inputs


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embedding's device (accelerate hooks move them on when it is offloaded)."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def sorted_batches(tokenizer, texts: Sequence[str], batch_size: int, device: torch.device) -> Iterator[Batch]:
    """Yield left-padded batches of ``texts`` (already chat-formatted), longest first."""
    # A chat template already contains the special tokens it needs; adding BOS again would shift activations.
    add_special = not getattr(tokenizer, "chat_template", None)
    encoded = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        yield Batch(idx, ids.to(device), mask.to(device), positions.to(device))

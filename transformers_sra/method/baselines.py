"""The edits SRA is compared with (their names and labels live in `labels`, which every layer may import):

* ``standard``: the field's usual abliteration: the difference of means of *all* harmful and harmless training
  prompts at SRA's direction layer, baked flat at γ = 1 into every writer;
* ``standard_filtered``: the same bake of SRA's own dirty direction (the training prompts filtered by what the
  base model refuses and answers, no atoms, no profile);
* ``rank1``: SRA's first (clean) direction alone, with its searched strength profile: SRA without mining;
* ``sra``: the edit as `apply_surgical_ablation` made it (first direction and every accepted mining pass).

`swapped_edit` swaps SRA's edit for one of the others inside a ``with`` block, as a real bake::

    with swapped_edit(model, report, "standard"):
        numbers = evaluate_model(model, tokenizer, sets, base=base)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..errors import SRAError
from ..labels import BASELINES, LABELS  # noqa: F401  (the names live in labels; here for old imports)
from .editing import bake_direction, reapply_edit


def bake_baseline(model: nn.Module, report, name: str) -> list:
    """Bake baseline ``name`` into the *unedited* ``model``; returns the bake handles (undo them to go back)."""
    layers = report.config.get("layers")
    if name == "standard":
        if not report.standard_direction:
            raise SRAError("this report has no standard direction (made by an older version); run sra ablate again")
        return [bake_direction(model, torch.tensor(report.standard_direction), 1.0, layers)]
    if name == "standard_filtered":
        return [bake_direction(model, torch.tensor(report.dirty_direction), 1.0, layers)]
    if name == "rank1":
        return [bake_direction(model, report.direction_tensor(0), report.strength, layers,
                               norm_preserving=bool(report.config.get("norm_preserving", False)))]
    raise SRAError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


@contextmanager
def swapped_edit(model: nn.Module, report, name: str) -> Iterator[None]:
    """Inside the block ``model`` carries baseline ``name`` instead of SRA's edit; on exit SRA is baked back."""
    if not report.handles:
        raise SRAError("comparing with a baseline needs the live report of apply_surgical_ablation "
                       "(not one loaded from JSON or already undone); use editing.reapply_edit first")
    report.undo()
    handles = []
    try:
        handles = bake_baseline(model, report, name)
        yield
    finally:
        for handle in reversed(handles):
            handle.undo()
        reapply_edit(model, report)

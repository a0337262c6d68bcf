"""Hard-negative mining: harmful prompts still refused after a bake define the next direction.

The next direction is the difference of means between the still-refused prompts and the harmless set,
measured on the edited model at the direction layer, ridge-residualized against the same atoms and made
exactly orthogonal to every direction already removed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .extraction import record_residuals
from .residualize import difference_of_means, orthogonalize, ridge_residualize


def next_direction(
    model: nn.Module,
    tokenizer,
    refused: Sequence[str],
    harmless: Sequence[str],
    layer: int,
    atoms: torch.Tensor,
    removed: Sequence[torch.Tensor],
    *,
    ridge_lambda: float,
    positions: Sequence[int] = (-1,),
    batch_size: int = 16,
    system_prompt: Optional[str] = None,
) -> torch.Tensor:
    """Unit direction separating ``refused`` from ``harmless`` at ``layer``, clean and ⟂ ``removed``."""
    kwargs = dict(layers=[layer], positions=positions, batch_size=batch_size, system_prompt=system_prompt)
    pos = record_residuals(model, tokenizer, refused, **kwargs)
    neg = record_residuals(model, tokenizer, harmless, **kwargs)
    raw = difference_of_means(pos, neg)[0]
    return orthogonalize(ridge_residualize(raw, atoms, ridge_lambda), removed)

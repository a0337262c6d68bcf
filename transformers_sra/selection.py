"""Pick the direction layer by activation-space ablation: hooks only, no weight is touched.

Each candidate layer's clean direction is ablated from every writer (exactly what baking would do) and
scored as ``mean refusal-token probability on held-out harmful prompts + kl_weight × first-token KL on
held-out harmless prompts``. The lowest score wins; the whole sweep goes into the report.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .editing import ablate_activations
from .judge import first_token_kl, first_token_logprobs, refusal_probability


def default_candidates(n_layers: int) -> list[int]:
    """Layers from 35% to 75% of depth, where refusal is read out; earlier ones carry little of it."""
    lo = int(0.35 * n_layers)
    return list(range(lo, max(int(0.75 * n_layers) + 1, lo + 1)))


def select_layer(
    model: nn.Module,
    tokenizer,
    directions: dict[int, torch.Tensor],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    base_harmless: torch.Tensor,
    *,
    strength: float = 1.0,
    kl_weight: float = 1.0,
    bake_layers: Optional[list[int]] = None,
    batch_size: int = 16,
    system_prompt: Optional[str] = None,
) -> tuple[int, list[dict]]:
    """Score every ``{layer: direction}`` candidate; return the best layer and the sweep, base row first.

    ``base_harmless`` holds the unedited model's first-token log-probabilities on ``harmless_val``.
    """
    kwargs = dict(batch_size=batch_size, system_prompt=system_prompt)
    base_refusal = refusal_probability(first_token_logprobs(model, tokenizer, harmful_val, **kwargs), refusal_ids)
    sweep = [{"layer": None, "refusal_prob": float(base_refusal.mean()), "kl": 0.0, "score": float(base_refusal.mean())}]
    for layer, direction in directions.items():
        with ablate_activations(model, direction, strength, bake_layers):
            refusal = refusal_probability(first_token_logprobs(model, tokenizer, harmful_val, **kwargs), refusal_ids)
            kl = first_token_kl(base_harmless, first_token_logprobs(model, tokenizer, harmless_val, **kwargs))
        score = float(refusal.mean()) + kl_weight * kl
        sweep.append({"layer": layer, "refusal_prob": float(refusal.mean()), "kl": kl, "score": score})
    best = min(sweep[1:], key=lambda row: row["score"])
    return best["layer"], sweep

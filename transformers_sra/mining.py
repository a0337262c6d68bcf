"""Hard-negative mining: harmful training prompts the edited model still refuses give the next direction.

The next direction is the difference of means between the still-refused prompts and the harmless set,
measured on the edited model at the direction layer, ridge-residualized against the same atoms and made
orthogonal to every direction already removed. Its strength is the largest of ``gammas`` that keeps the
validation budgets, and the pass is kept only if it lowers the validation refusal score: it is judged on
validation prompts, never on the training prompts it was mined from.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .config import Budgets
from .editing import BakeStack, ablate_activations
from .extraction import record_residuals
from .judge import Judge, first_token_logprobs, judge_name, refusal_probability
from .progress import bar
from .residualize import difference_of_means, orthogonalize, ridge_residualize
from .search import Validation


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


def mine(
    model: nn.Module,
    tokenizer,
    bakes: BakeStack,
    harmful: Sequence[str],
    harmless: Sequence[str],
    val: Validation,
    current: dict,
    *,
    layer: int,
    atoms: torch.Tensor,
    iterations: int,
    max_kl: float,
    max_ppl_increase: float,
    ridge_lambda: float,
    gammas: Sequence[float] = (1.0, 0.5, 0.25),
    bake_layers: Optional[list[int]] = None,
    positions: Sequence[int] = (-1,),
    batching: Optional[dict] = None,
    judge: Optional[Judge] = None,
) -> list[dict]:
    """Run up to ``iterations`` mining passes on top of ``bakes``; returns one row per pass tried.

    ``current`` is the validation measurement of the model as baked so far. Still-refused training prompts
    are those whose first-token refusal score is above 0.5 (no generation). ``judge`` (the run's resolved
    judge) is recorded in every row; judging generated replies with it is the planned replacement for the score.
    """
    batching = batching or {}
    budgets = Budgets(max_kl, max_ppl_increase)
    rows = []
    for iteration in bar(range(1, iterations + 1), desc="mining pass", unit="pass"):
        score = refusal_probability(first_token_logprobs(model, tokenizer, harmful, **batching), val.refusal_ids)
        refused = [p for p, s in zip(harmful, score.tolist()) if s > 0.5]
        row = {"iteration": iteration, "refused_train": len(refused), "total_train": len(harmful), "accepted": False,
               "judge": judge_name(judge)}
        rows.append(row)
        if len(refused) < 2:
            break
        direction = next_direction(model, tokenizer, refused, harmless, layer, atoms, bakes.directions,
                                   ridge_lambda=ridge_lambda, positions=positions, **batching)
        for gamma in gammas:  # the strongest γ that keeps both budgets
            with ablate_activations(model, direction, gamma, bake_layers):
                measured = val.measure(model, tokenizer)
            if budgets.allows(measured):
                break
        row.update(gamma=gamma, **measured)
        if not (budgets.allows(measured) and measured["refusal_score"] < current["refusal_score"]):
            break  # a mined direction that does not pay for itself on validation only costs capability
        bakes.bake(direction, gamma, bake_layers)
        row["accepted"] = True
        current = measured
    return rows

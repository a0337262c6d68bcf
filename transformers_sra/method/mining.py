"""Hard-negative mining from judged replies: the refusals the first direction leaves give the next direction.

After a bake, the edited model answers the harmful training prompts (short greedy replies) and `judge.classify`
reads them. The prompts it still *refuses* (degenerate replies left out) are the hard negatives. The next
direction is the difference of means at the direction layer, on the edited model, between them and a contrast:
the harmful prompts the edited model now answers (same topics, refusal alone; the default) or the harmless set.
It is ridge-residualized against the same Shields, Confounds and fluency Shield as the first direction and made
orthogonal to every direction already removed. Its strength is the largest of ``gammas`` within both validation
budgets, and the pass is kept only if the *judged* replies to validation prompts refuse less (without trading
refusals for loops); it is never judged on the training prompts it was mined from::

    setup = MiningSetup.from_config(config, inputs, val, layer=14, atoms=atoms)   # as the pipeline builds it
    setup = MiningSetup(harmful=harmful, harmless=harmless, judged_val=judged_val, val=val, layer=14, atoms=atoms,
                        budgets=Budgets(max_kl=0.05, max_ppl_increase=0.005), ridge_lambda=0.01)   # or field by field
    rows = mine(model, tokenizer, bakes, setup, iterations=2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..batching import reply_batching
from ..config import Budgets, SRAConfig
from ..progress import bar
from ..signals.judge import Classifier, Outcome, classify, generate, outcome_counts
from .editing import BakeStack, ablate_activations
from .extraction import record_residuals
from .inputs import RunInputs
from .residualize import difference_of_means, orthogonalize, ridge_residualize
from .search import Validation

#: Reply length when mining and accepting: the refusals left after a bake come in the first words.
MINING_TOKENS = 32
CONTRASTS = ("answered", "harmless")


@dataclass(kw_only=True)
class MiningSetup:
    """What every mining pass reads; fixed for the run. Built by `from_config`, or field by field (by name)."""

    harmful: Sequence[str]  # training prompts whose judged replies give the hard negatives
    harmless: Sequence[str]
    judged_val: Sequence[str]  # validation prompts whose judged replies decide whether a pass is kept
    val: Validation  # first-token and perplexity budgets
    layer: int
    atoms: torch.Tensor  # rows regressed out of every mined direction (Shields, Confounds, fluency Shield)
    budgets: Budgets
    ridge_lambda: float
    classify: Classifier = classify
    contrast: str = "answered"  # what the still-refused prompts are contrasted with (see `CONTRASTS`)
    gammas: Sequence[float] = (1.0, 0.5, 0.25)
    reply_tokens: int = MINING_TOKENS
    min_refused: int = 4
    bake_layers: Optional[list[int]] = None
    positions: Sequence[int] = (-1,)
    batching: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: SRAConfig, inputs: RunInputs, val: Validation, *, layer: int, atoms: torch.Tensor,
                    classify: Classifier = classify) -> "MiningSetup":
        """The pipeline's setup: hard negatives from the harmful training prompts (contrasted with the harmless set
        or the answered ones, as ``config.mining_contrast`` says), every other harmful validation prompt judged for
        acceptance, and the budgets, ridge λ, baked layers, positions and batching of ``config``."""
        return cls(harmful=inputs.prompts("harmful"), harmless=inputs.prompts("harmless"),
                   judged_val=inputs.prompts("harmful_val")[0::2], val=val, layer=layer, atoms=atoms,
                   budgets=config.budgets, ridge_lambda=config.ridge_lambda, classify=classify,
                   contrast=config.mining_contrast, bake_layers=config.layers, positions=config.positions,
                   batching=config.batching)


def judge_replies(model: nn.Module, tokenizer, prompts: Sequence[str], setup: MiningSetup) -> list[Outcome]:
    """The outcome of each prompt's short greedy reply under the model as it is now (hooks included)."""
    replies = generate(model, tokenizer, prompts, max_new_tokens=setup.reply_tokens, **reply_batching(setup.batching))
    return [setup.classify(r) for r in replies]


def next_direction(model: nn.Module, tokenizer, refused: Sequence[str], contrast: Sequence[str], setup: MiningSetup,
                   removed: Sequence[torch.Tensor]) -> torch.Tensor:
    """Unit direction separating ``refused`` from ``contrast`` at the layer, clean and ⟂ ``removed``."""
    kwargs = dict(layers=[setup.layer], positions=setup.positions, **setup.batching)
    raw = difference_of_means(record_residuals(model, tokenizer, refused, **kwargs),
                              record_residuals(model, tokenizer, contrast, **kwargs))[0]
    return orthogonalize(ridge_residualize(raw, setup.atoms, setup.ridge_lambda), removed)


def mine(model: nn.Module, tokenizer, bakes: BakeStack, setup: MiningSetup, iterations: int) -> list[dict]:
    """Run up to ``iterations`` mining passes on top of ``bakes``; returns one row per pass tried."""
    rows: list[dict] = []
    if iterations < 1:
        return rows
    current = outcome_counts(judge_replies(model, tokenizer, setup.judged_val, setup))
    for iteration in bar(range(1, iterations + 1), desc="mining pass", unit="pass"):
        outcomes = judge_replies(model, tokenizer, setup.harmful, setup)
        refused = [p for p, o in zip(setup.harmful, outcomes) if o is Outcome.REFUSED]
        answered = [p for p, o in zip(setup.harmful, outcomes) if o is Outcome.ANSWERED]
        row = {"iteration": iteration, "train": outcome_counts(outcomes), "total_train": len(setup.harmful),
               "refused_train": len(refused), "judged_val_before": current, "accepted": False,
               "judge": getattr(setup.classify, "__name__", type(setup.classify).__name__)}
        rows.append(row)
        contrast = answered if setup.contrast == "answered" and len(answered) >= setup.min_refused else setup.harmless
        if len(refused) < setup.min_refused:
            row["stopped"] = f"fewer than {setup.min_refused} training prompts still refused"
            break
        direction = next_direction(model, tokenizer, refused, contrast, setup, bakes.directions)
        row["contrast"] = setup.contrast if contrast is answered else "harmless"
        for gamma in setup.gammas:  # the strongest γ that keeps both budgets
            with ablate_activations(model, direction, gamma, setup.bake_layers):
                measured = setup.val.measure(model, tokenizer)
            if setup.budgets.allows(measured):
                break
        row.update(gamma=gamma, **measured)
        if not setup.budgets.allows(measured):
            row["stopped"] = "no strength keeps both budgets"
            break
        with ablate_activations(model, direction, gamma, setup.bake_layers):
            judged = outcome_counts(judge_replies(model, tokenizer, setup.judged_val, setup))
        row["judged_val"] = judged
        fewer_refused = judged["refused"] < current["refused"]
        no_loops_traded = judged["refused"] + judged["degenerate"] < current["refused"] + current["degenerate"]
        if not (fewer_refused and no_loops_traded):
            row["stopped"] = "judged validation replies refuse no less"
            break  # a mined direction that does not pay for itself on validation only costs capability
        bakes.bake(direction, gamma, setup.bake_layers)
        row["accepted"] = True
        current = judged
    return rows

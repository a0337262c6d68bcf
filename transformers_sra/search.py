"""Choose where and how hard to remove refusal: a constrained search over hook ablations.

Each candidate (direction layer, rank of the fluency Shield, strength profile) is applied through
forward hooks on the residual writers (numerically the bake, with no weight touched) and measured on
validation data only:

* **refusal score**: mean first-token probability of refusal openings on the held-out harmful prompts;
* **KL**: mean first-token KL(base ‖ edited) on the held-out harmless prompts;
* **ΔPPL**: relative perplexity change on a held-back slice of the text corpus.

The choice minimises the refusal score **subject to** KL ≤ ``max_kl`` and ΔPPL ≤ ``max_ppl_increase``;
it is not a weighted sum. The search is coordinate-wise (layers, then Shield ranks, then profiles), so it
costs a dozen scoring passes, not hundreds of generate-everything trials. Every row goes into the report::

    val = Validation.measure_base(model, tokenizer, harmful_val, harmless_val, text_val)
    choice, table = constrained_search(model, tokenizer, directions, val, layers=[12, 14], ranks=[0, 64],
                                       profiles=[StrengthProfile()], max_kl=0.05, max_ppl_increase=0.005)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .config import Budgets
from .editing import ablate_activations
from .judge import first_token_kl, first_token_logprobs, refusal_probability, refusal_token_ids
from .nll import token_nll
from .profile import StrengthProfile
from .progress import bar


def default_candidates(n_layers: int) -> list[int]:
    """Direction layers from 50% to 70% of depth, where refusal is read out (measured on the demo model's
    validation split: layers below half depth remove less refusal for more KL)."""
    lo = int(0.5 * n_layers)
    return list(range(lo, max(int(0.7 * n_layers) + 1, lo + 1)))


def default_profiles() -> list[StrengthProfile]:
    """The strength profiles the search tries; the first one also scores layers and ranks.

    Chosen on the demo model's validation split: a tent peaking at 60% of depth keeps KL and perplexity
    well inside the budgets where flat γ = 1 does not (flat γ = 1 never met the perplexity budget there,
    +1.1% to +1.7%); the steeper ones buy refusal with the KL left over.
    """
    return [
        StrengthProfile(peak=1.2, floor=0.2, center=0.6, width=0.4),
        StrengthProfile(peak=1.4, floor=0.3, center=0.6, width=0.4),
        StrengthProfile(peak=1.6, floor=0.4, center=0.6, width=0.35),
        StrengthProfile(peak=2.0, floor=0.0, center=0.6, width=0.3),
    ]


@dataclass
class Validation:
    """Validation prompts and text with the base model's numbers, measured once before any edit."""

    harmful: list[str]
    harmless: list[str]
    text: list[str]
    refusal_ids: list[int]
    base_harmless: torch.Tensor  # first-token log-probabilities of the base model on ``harmless``
    base_refusal: float  # mean refusal score of the base model on ``harmful``
    base_nll: float  # mean next-token NLL of the base model on ``text``
    batching: dict = field(default_factory=dict)

    @classmethod
    def measure_base(cls, model: nn.Module, tokenizer, harmful: Sequence[str], harmless: Sequence[str],
                     text: Sequence[str], **batching) -> "Validation":
        ids = refusal_token_ids(tokenizer)
        score = refusal_probability(first_token_logprobs(model, tokenizer, harmful, **batching), ids)
        total, count = token_nll(model, tokenizer, text)
        return cls(list(harmful), list(harmless), list(text), ids,
                   first_token_logprobs(model, tokenizer, harmless, **batching), float(score.mean()),
                   total / max(count, 1), batching)

    def measure(self, model: nn.Module, tokenizer, text_if: Optional[Callable[[dict], bool]] = None) -> dict:
        """Refusal score, KL and ΔPPL of ``model`` as it is now (hooks included).

        ``text_if(row)`` sees the refusal score and KL first; when it says no, the perplexity pass (about a
        third of the cost) is skipped and ``ppl_change`` is None.
        """
        refusal = refusal_probability(first_token_logprobs(model, tokenizer, self.harmful, **self.batching), self.refusal_ids)
        kl = first_token_kl(self.base_harmless, first_token_logprobs(model, tokenizer, self.harmless, **self.batching))
        row = {"refusal_score": round(float(refusal.mean()), 5), "kl": round(kl, 5), "ppl_change": None}
        if text_if is None or text_if(row):
            total, count = token_nll(model, tokenizer, self.text)
            row["ppl_change"] = round(math.exp(total / max(count, 1) - self.base_nll) - 1, 5)
        return row


@dataclass(frozen=True)
class Candidate:
    layer: int  # layer whose clean direction is removed
    rank: int  # rank of the fluency Shield regressed out of it
    profile: StrengthProfile


def constrained_search(
    model: nn.Module,
    tokenizer,
    directions: Mapping[tuple[int, int], torch.Tensor],
    val: Validation,
    *,
    layers: Sequence[int],
    ranks: Sequence[int],
    profiles: Sequence[StrengthProfile],
    max_kl: float,
    max_ppl_increase: float,
    bake_layers: Optional[list[int]] = None,
    progress: Optional[Callable[[dict], None]] = None,
) -> tuple[Candidate, list[dict]]:
    """Coordinate search: layers (first rank and profile), then ranks, then profiles; best feasible wins.

    ``directions[(layer, rank)]`` is the clean unit direction of ``layer`` with a rank-``rank`` fluency
    Shield. Returns the choice and the table of every scored candidate (``feasible`` marks those within
    both budgets; if none is, the least violating one is returned and marked so). A candidate over the KL
    budget, or no better than the best feasible one so far, cannot win, so its perplexity is not measured
    (``ppl_change`` None).
    """
    budgets = Budgets(max_kl, max_ppl_increase)
    table: list[dict] = []
    scored: dict[Candidate, dict] = {}
    ticker = bar(total=len(layers) + len(ranks) + len(profiles) - 2, desc="search", unit="candidate")

    def could_win(row: dict) -> bool:
        # perplexity is only worth measuring for a candidate within the KL budget that beats the best so far
        best = min((r["refusal_score"] for r in table if r["feasible"]), default=math.inf)
        return row["kl"] <= budgets.max_kl and row["refusal_score"] < best

    def score(c: Candidate) -> dict:
        if c not in scored:
            start = time.perf_counter()
            with ablate_activations(model, directions[(c.layer, c.rank)], c.profile, bake_layers):
                row = val.measure(model, tokenizer, text_if=could_win)
            row = {"layer": c.layer, "rank": c.rank, "profile": c.profile.to_dict(), **row, "feasible": budgets.allows(row),
                   "seconds": round(time.perf_counter() - start, 2)}
            scored[c] = row
            table.append(row)
            ticker.update(1)
            if progress is not None:
                progress(row)
        return scored[c]

    def best(cands: Sequence[Candidate]) -> Candidate:
        rows = [(c, score(c)) for c in cands]
        return min(rows, key=lambda cr: _rank_key(cr[1], budgets))[0]

    choice = best([Candidate(l, ranks[0], profiles[0]) for l in layers])
    choice = best([Candidate(choice.layer, r, choice.profile) for r in ranks])
    choice = best([Candidate(choice.layer, choice.rank, p) for p in profiles])
    choice = min(scored, key=lambda c: _rank_key(scored[c], budgets))
    if scored[choice]["ppl_change"] is None:  # a fallback (nothing feasible): the report still gets its ΔPPL
        with ablate_activations(model, directions[(choice.layer, choice.rank)], choice.profile, bake_layers):
            scored[choice]["ppl_change"] = val.measure(model, tokenizer)["ppl_change"]
    ticker.close()
    for row in table:
        row["chosen"] = row is scored[choice]
    return choice, table


def _rank_key(row: dict, budgets: Budgets) -> tuple:
    # feasible rows by refusal score; infeasible ones after them, by how far they overshoot a budget
    ppl, max_ppl = row["ppl_change"], budgets.max_ppl_increase
    violation = max(row["kl"] / budgets.max_kl, 0.0 if ppl is None else ppl / max_ppl if max_ppl > 0 else math.inf)
    if ppl is None and violation <= 1:  # not measured because it could not win: after every feasible row
        violation = 1.0 + 1e-9
    return (0, row["refusal_score"]) if violation <= 1 else (1, violation)

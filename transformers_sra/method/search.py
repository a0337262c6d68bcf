"""Choose where and how hard to remove refusal: a constrained search over hook ablations.

Each candidate (direction layer, rank of the fluency Shield, strength profile) is applied through
forward hooks on the residual writers (numerically the bake, with no weight touched) and measured on
validation data only:

* **KL**: mean first-token KL(base ‖ edited) on the held-out harmless prompts;
* **refusal score**: mean first-token probability of refusal openings on the held-out harmful prompts;
* **ΔPPL**: relative perplexity change on a held-back slice of the text corpus.

The screen minimises the refusal score **subject to** KL ≤ ``max_kl`` and ΔPPL ≤ ``max_ppl_increase``;
it is not a weighted sum. The search is coordinate-wise (layers, then Shield ranks, then profiles), so it
costs a dozen scoring passes, not hundreds of generate-everything trials. Each pass is run only where it can
change the choice: the refusal score within the KL budget, ΔPPL for the lowest refusal score still in
contention. The first-token score is a proxy: it orders edits of one kind as judged replies do, but not edits of
different kinds. With ``judging`` (`JudgedRanking`), the few contenders within both budgets with the lowest
scores are then ranked by what is published: judged refusal of verdict-stopped greedy replies to the harmful
validation prompts the base model refuses, degenerate replies counted apart and capped at the base model's share
plus a margin. Every row
goes into the report, with both ranks::

    val = Validation.measure_base(model, tokenizer, harmful_val, harmless_val, text_val)
    space = SearchSpace(directions, layers=[12, 14], ranks=[0, 64], profiles=[StrengthProfile()])
    choice, table = constrained_search(model, tokenizer, space, val, Budgets(max_kl=0.05, max_ppl_increase=0.005))
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..batching import reply_batching
from ..config import Budgets
from ..progress import bar
from ..signals.judge import Classifier, VerdictStop, generate, is_shipped_judge, outcome_counts
from ..signals.logprobs import checked_kls, first_token_kl, first_token_logprobs, refusal_probability, refusal_token_ids
from ..signals.nll import token_nll
from ..strength import StrengthProfile
from .editing import ablate_activations


def default_candidates(n_layers: int) -> list[int]:
    """Direction layers from 50% to 70% of depth, where refusal is read out (measured on the demo model's
    validation split: layers below half depth remove less refusal for more KL)."""
    lo = int(0.5 * n_layers)
    return list(range(lo, max(int(0.7 * n_layers) + 1, lo + 1)))


def default_profiles(per_layer: bool = False) -> list[StrengthProfile]:
    """The strength profiles the search tries; the first one also scores layers and ranks.

    Chosen on the demo model's validation split: a tent peaking at 60% of depth keeps KL and perplexity
    well inside the budgets where flat γ = 1 does not (flat γ = 1 never met the perplexity budget there,
    +1.1% to +1.7%); the steeper ones buy refusal with the KL left over. Per-layer directions move the
    model more per unit of γ (the first tent ×1.0 cost first-token KL 0.090 there, ×0.6 0.050), so they get the
    first tent scaled from ×0.5 to ×0.7.
    """
    if per_layer:
        first = default_profiles()[0]
        return [dataclasses.replace(first, peak=round(first.peak * s, 3), floor=round(first.floor * s, 3))
                for s in (0.5, 0.55, 0.6, 0.65, 0.7)]
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
    base_outcomes: Optional[dict] = None  # the base model's judged outcome counts on `judged_prompts`, once measured
    base_scores: Optional[list[float]] = None  # the base model's refusal score of each ``harmful`` prompt
    screen_prompts: int = 0  # the first this many prompts of each set screen a candidate (0: every candidate reads all)

    @classmethod
    def measure_base(cls, model: nn.Module, tokenizer, harmful: Sequence[str], harmless: Sequence[str],
                     text: Sequence[str], *, screen_prompts: int = 0, **batching) -> "Validation":
        ids = refusal_token_ids(tokenizer)
        score = refusal_probability(first_token_logprobs(model, tokenizer, harmful, **batching), ids)
        total, count = token_nll(model, tokenizer, text)
        return cls(list(harmful), list(harmless), list(text), ids,
                   first_token_logprobs(model, tokenizer, harmless, **batching), float(score.mean()),
                   total / max(count, 1), batching, base_scores=score.tolist(), screen_prompts=screen_prompts)

    @property
    def judged_prompts(self) -> list[str]:
        """The harmful prompts whose replies rank the contenders: those the base model refuses by its first token
        (score > 0.5, as the behaviour filter reads it), or all of them if fewer than 16 are. A prompt the base model
        already answers stays answered under an edit that removes refusal, so it would cost replies and decide
        nothing."""
        refused = [p for p, s in zip(self.harmful, self.base_scores or []) if s > 0.5]
        return refused if len(refused) >= 16 else list(self.harmful)

    def measure(self, model: nn.Module, tokenizer, refusal_if: Optional[Callable[[dict], bool]] = None,
                text_if: Optional[Callable[[dict], bool]] = None) -> dict:
        """KL, refusal score and ΔPPL of ``model`` as it is now (hooks included).

        KL comes first. ``refusal_if(row)`` and then ``text_if(row)`` see the row measured so far; when one says no,
        its pass is skipped and its number is None (`refusal_score`, `perplexity_change`: the same passes alone).
        """
        kl = first_token_kl(self.base_harmless, first_token_logprobs(model, tokenizer, self.harmless, **self.batching))
        row = {"refusal_score": None, "kl": round(kl, 5), "ppl_change": None}
        if refusal_if is None or refusal_if(row):
            row["refusal_score"] = self.refusal_score(model, tokenizer)
        if text_if is None or text_if(row):
            row["ppl_change"] = self.perplexity_change(model, tokenizer)
        return row

    def refusal_score(self, model: nn.Module, tokenizer) -> float:
        """Mean first-token refusal probability on the harmful prompts."""
        return round(float(self.refusal_scores(model, tokenizer, slice(None)).mean()), 5)

    def refusal_scores(self, model: nn.Module, tokenizer, rows: slice) -> torch.Tensor:
        """First-token refusal probability of each of ``harmful[rows]``."""
        logprobs = first_token_logprobs(model, tokenizer, self.harmful[rows], **self.batching)
        return refusal_probability(logprobs, self.refusal_ids).float()

    def kls(self, model: nn.Module, tokenizer, rows: slice) -> torch.Tensor:
        """First-token KL(base ‖ model) of each of ``harmless[rows]``."""
        logprobs = first_token_logprobs(model, tokenizer, self.harmless[rows], **self.batching)
        return checked_kls(self.base_harmless[rows], logprobs).float()

    def perplexity_change(self, model: nn.Module, tokenizer) -> float:
        """Relative perplexity change on the held-back text against the base model's."""
        total, count = token_nll(model, tokenizer, self.text)
        return round(math.exp(total / max(count, 1) - self.base_nll) - 1, 5)

    def base_judged(self, model: nn.Module, tokenizer, judging: "JudgedRanking") -> dict[str, int]:
        """`judged` for the base model (call it with no edit in place), measured once."""
        if self.base_outcomes is None:
            self.base_outcomes = self.judged(model, tokenizer, judging)
        return self.base_outcomes

    def judged(self, model: nn.Module, tokenizer, judging: "JudgedRanking") -> dict[str, int]:
        """Outcome counts of greedy replies to `judged_prompts` (the shipped judge stops a row once its refusal is
        settled; another judge reads every reply to its full length)."""
        stop = VerdictStop.refusal_settled if is_shipped_judge(judging.classify) else None
        replies = generate(model, tokenizer, self.judged_prompts, max_new_tokens=judging.max_new_tokens,
                           stop_when=stop, **reply_batching(self.batching))
        return outcome_counts([judging.classify(r) for r in replies])


@dataclass(frozen=True)
class JudgedRanking:
    """How the search's contenders are ranked by judged replies (see the module docstring)."""

    classify: Classifier
    contenders: int = 4  # candidates within both budgets, lowest refusal scores first, that get judged replies
    max_new_tokens: int = 64
    degenerate_margin: float = 0.02  # a contender may have at most the base model's degenerate share + this


@dataclass(frozen=True)
class SearchSpace:
    """What the search chooses among: the clean unit direction of each (layer, fluency Shield rank) in
    ``directions[(layer, rank)]``, the direction layers and ranks to try (first = start), the strength profiles, and
    the decoder layers whose writers every candidate edits (None = all)."""

    directions: Mapping[tuple[int, int], torch.Tensor]
    layers: Sequence[int]
    ranks: Sequence[int]
    profiles: Sequence[StrengthProfile]
    bake_layers: Optional[list[int]] = None


@dataclass(frozen=True)
class Candidate:
    layer: int  # layer whose clean direction is removed (with per-layer directions: up to it, each later its own)
    rank: int  # rank of the fluency Shield regressed out of it
    profile: StrengthProfile


def constrained_search(
    model: nn.Module,
    tokenizer,
    space: SearchSpace,
    val: Validation,
    budgets: Budgets,
    *,
    judging: Optional[JudgedRanking] = None,
    score_all: bool = False,
    progress: Optional[Callable[[dict], None]] = None,
) -> tuple[Candidate, list[dict]]:
    """Coordinate search: layers (first rank and profile), then ranks, then profiles; best feasible wins.

    Returns the choice among ``space`` (`SearchSpace`) and the table of every scored candidate (``feasible`` marks
    those within both ``budgets``; if none is, the least violating one is returned and marked so).

    Only the passes that can change the choice are run, so the choice is the one scoring everything would make:
    a candidate over the KL budget cannot win, so its refusal score is not measured (None; ``score_all=True``
    measures it, as the audit's layer sweep does); ΔPPL is measured for the candidates within the KL budget in
    order of refusal score, until one is within the perplexity budget (the others keep None). ``progress(row)``
    is called once per candidate, when it is scored; a ΔPPL measured later is written into the same row.

    With ``val.screen_prompts`` (n), a candidate is first scored on the first n prompts of each set (`Screen`) and
    read on to the full sets only when that screen cannot separate it: when it might be within the KL budget and
    might rank before a candidate the walk has reached (one-sided paired 99% bounds on the same prompts). A row
    left at the screen keeps its n in ``screened``.

    With ``judging``, ΔPPL is measured further down that order until ``judging.contenders`` candidates are within
    both budgets; if there are two or more, their judged replies decide (`judged_choice`), and their rows get
    ``judged`` (outcome counts), ``proxy_rank`` and ``judged_rank``.
    """
    layers, ranks, profiles = space.layers, space.ranks, space.profiles
    table: list[dict] = []
    scored: dict[Candidate, dict] = {}
    screen = Screen(val, budgets.max_kl) if not score_all else None
    if screen is not None and not screen.n:
        screen = None
    ticker = bar(total=len(layers) + len(ranks) + len(profiles) - 2, desc="search", unit="candidate")

    def within_kl(row: dict) -> bool:
        return row["kl"] <= budgets.max_kl

    def partial(c: Candidate) -> bool:  # scored on the screen's prompts only, so far
        return screen is not None and screen.partial(c)

    def measured(c: Candidate, measure: Callable[[], dict]) -> dict:
        start = time.perf_counter()
        with ablate_activations(model, space.directions[(c.layer, c.rank)], c.profile, space.bake_layers):
            numbers = measure()
        return {**numbers, "seconds": time.perf_counter() - start}

    def add(c: Candidate, numbers: dict) -> None:
        row = {"layer": c.layer, "rank": c.rank, "profile": c.profile.to_dict(), **numbers, "feasible": False}
        row["seconds"] = round(row["seconds"], 2)
        scored[c] = row
        table.append(row)
        ticker.update(1)
        if progress is not None:
            progress(row)

    def score(c: Candidate) -> None:
        if c in scored:
            return
        if screen is not None:
            add(c, measured(c, lambda: screen.first(c, model, tokenizer)))
        else:
            add(c, measured(c, lambda: val.measure(model, tokenizer, refusal_if=None if score_all else within_kl,
                                                   text_if=lambda row: False)))

    def read_on(c: Candidate) -> None:  # a screened candidate, read to the full sets
        if partial(c):
            numbers = measured(c, lambda: screen.rest(c, model, tokenizer))
            scored[c]["seconds"] = round(scored[c]["seconds"] + numbers.pop("seconds"), 2)
            scored[c].update(numbers)
            scored[c].pop("screened", None)

    def complete(c: Candidate, name: str, measure: Callable) -> None:
        read_on(c)
        row = scored[c]
        if row[name] is None:
            numbers = measured(c, lambda: {name: measure(model, tokenizer)})
            row[name] = numbers[name]
            row["seconds"] = round(row["seconds"] + numbers["seconds"], 2)
            row["feasible"] = budgets.allows(row)

    def feasible_in_order(cands: Sequence[Candidate], n: int) -> list[Candidate]:
        """The first ``n`` candidates within both budgets in the order of their full-set refusal scores, ΔPPL
        measured down that order; a screened candidate is read on once it might come before the one reached."""
        while True:
            full = sorted((c for c in cands if not partial(c) and within_kl(scored[c])),
                          key=lambda c: scored[c]["refusal_score"])
            pending = [c for c in cands if partial(c) and not screen.over_kl(c)]
            if not full and pending:  # the screen's most promising candidate anchors the walk
                read_on(min(pending, key=screen.mean_refusal))
                continue
            found, blocked = [], []
            for c in full:
                blocked = [p for p in pending if not screen.worse(p, c)]
                if blocked:
                    break
                complete(c, "ppl_change", val.perplexity_change)
                if scored[c]["feasible"]:
                    found.append(c)
                    if len(found) == n:
                        return found
            blocked = blocked or pending  # past the last full candidate: whatever the screen kept back may be next
            if not blocked:
                return found
            for p in blocked:
                read_on(p)

    def best(cands: Sequence[Candidate]) -> Candidate:
        for c in cands:
            score(c)
        found = feasible_in_order(cands, 1)
        if found:
            return found[0]
        for c in cands:  # nothing feasible: the least violating, on full-set numbers
            read_on(c)
        return min(cands, key=lambda c: _violation(scored[c], budgets))

    choice = best([Candidate(l, ranks[0], profiles[0]) for l in layers])
    choice = best([Candidate(choice.layer, r, choice.profile) for r in ranks])
    choice = best([Candidate(choice.layer, choice.rank, p) for p in profiles])  # each step holds the last choice
    if judging is not None and scored[choice]["feasible"]:
        contenders = feasible_in_order(list(scored), judging.contenders)
        if len(contenders) > 1:
            choice = judged_choice(contenders, scored, lambda c: measured(c, lambda: val.judged(model, tokenizer, judging)),
                                   val.base_judged(model, tokenizer, judging), judging.degenerate_margin)
    # a fallback over the KL budget: the report still gets its refusal score and ΔPPL
    complete(choice, "refusal_score", val.refusal_score)
    complete(choice, "ppl_change", val.perplexity_change)
    ticker.close()
    for row in table:
        row["chosen"] = row is scored[choice]
    return choice, table


class Screen:
    """Each candidate's per-prompt numbers on the first ``val.screen_prompts`` prompts of each validation set, and
    the one-sided 99% bounds that decide whether reading the rest could change the search's choice. The screen
    holds when the sets have at least twice that many prompts and ``val`` gives per-prompt numbers."""

    Z = 2.326  # one-sided 99%

    def __init__(self, val: Validation, max_kl: float):
        n = getattr(val, "screen_prompts", 0)
        enough = hasattr(val, "kls") and 0 < 2 * n <= min(len(val.harmful), len(val.harmless))
        self.val, self.max_kl, self.n = val, max_kl, n if enough else 0
        self.kls: dict[Candidate, torch.Tensor] = {}
        self.refusals: dict[Candidate, torch.Tensor] = {}

    def first(self, c: Candidate, model: nn.Module, tokenizer) -> dict:
        """KL on the first n harmless prompts, then, unless surely over the KL budget, the refusal score on the
        first n harmful ones."""
        head = slice(0, self.n)
        self.kls[c] = self.val.kls(model, tokenizer, head)
        row = {"refusal_score": None, "kl": round(float(self.kls[c].mean()), 5), "ppl_change": None,
               "screened": self.n}
        if not self.over_kl(c):
            self.refusals[c] = self.val.refusal_scores(model, tokenizer, head)
            row["refusal_score"] = round(float(self.refusals[c].mean()), 5)
        return row

    def rest(self, c: Candidate, model: nn.Module, tokenizer) -> dict:
        """The full-set numbers: the remaining prompts' KLs, and the refusal score where within the KL budget."""
        self.kls[c] = torch.cat([self.kls[c], self.val.kls(model, tokenizer, slice(self.n, None))])
        row = {"kl": round(float(self.kls[c].mean()), 5), "refusal_score": None}
        if row["kl"] <= self.max_kl:
            have = self.refusals.get(c, torch.zeros(0))
            self.refusals[c] = torch.cat([have, self.val.refusal_scores(model, tokenizer, slice(len(have), None))])
            row["refusal_score"] = round(float(self.refusals[c].mean()), 5)
        return row

    def partial(self, c: Candidate) -> bool:
        return c in self.kls and len(self.kls[c]) == self.n

    def over_kl(self, c: Candidate) -> bool:
        """Surely over the KL budget: the lower bound of the screen's mean KL is above it."""
        return _lower_bound(self.kls[c][: self.n]) > self.max_kl

    def mean_refusal(self, c: Candidate) -> float:
        return float(self.refusals[c][: self.n].mean())

    def worse(self, p: Candidate, c: Candidate) -> bool:
        """``p`` surely refuses more than ``c``: the paired difference on the screen's prompts is above 0."""
        if p not in self.refusals or c not in self.refusals:
            return False
        return _lower_bound(self.refusals[p][: self.n] - self.refusals[c][: self.n]) > 0


def _lower_bound(values: torch.Tensor) -> float:
    """One-sided 99% lower bound of the mean (normal approximation)."""
    n = len(values)
    return float(values.mean() - Screen.Z * values.std() / math.sqrt(n)) if n > 1 else float("-inf")


def judged_choice(contenders: Sequence[Candidate], rows: Mapping[Candidate, dict], judge: Callable[[Candidate], dict],
                  base: Mapping[str, int], degenerate_margin: float) -> Candidate:
    """The contender whose judged replies refuse least, among those with at most the base model's degenerate share
    plus ``degenerate_margin`` (if none qualifies, the one with the fewest degenerate replies); ties go to the lower
    refusal score. ``contenders`` come in proxy order; ``judge(c)`` returns outcome counts (and ``seconds``)."""
    for rank, c in enumerate(contenders, 1):
        numbers = judge(c)
        rows[c]["seconds"] = round(rows[c]["seconds"] + numbers.pop("seconds", 0.0), 2)
        rows[c].update(judged=numbers, proxy_rank=rank)
    n = max(sum(base.values()), 1)
    cap = base["degenerate"] / n + degenerate_margin

    def key(c: Candidate) -> tuple:
        judged = rows[c]["judged"]
        over = judged["degenerate"] / max(sum(judged.values()), 1) > cap
        return (over, judged["degenerate"] if over else 0, judged["refused"], rows[c]["refusal_score"])

    ordered = sorted(contenders, key=key)
    for rank, c in enumerate(ordered, 1):
        rows[c]["judged_rank"] = rank
    return ordered[0]


def _violation(row: dict, budgets: Budgets) -> float:
    """How far ``row`` overshoots its worse budget, as a multiple of it (an unmeasured ΔPPL counts as none)."""
    ppl, max_ppl = row["ppl_change"], budgets.max_ppl_increase
    return max(row["kl"] / budgets.max_kl, 0.0 if ppl is None else ppl / max_ppl if max_ppl > 0 else math.inf)

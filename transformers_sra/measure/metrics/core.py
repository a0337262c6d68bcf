"""Numbers that say what an edit cost: perplexity on plain text or on reference answers, exact intervals.

::

    ppl = perplexity(model, tokenizer, load_corpus("general_val"))
    total, count = answer_nll(model, tokenizer, [("What is 2+3?", "2 + 3 = 5. The answer is 5.")])
    lo, hi = clopper_pearson(4, 200)          # 95% interval of a 2% rate measured on 200 prompts
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

from ...signals.judge import OUTCOMES, Outcome
from ...signals.nll import token_nll


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], **kwargs) -> float:
    """exp(mean next-token NLL) of ``texts`` read as plain text."""
    total, count = token_nll(model, tokenizer, texts, **kwargs)
    return math.exp(total / max(count, 1))


def nll_result(total: float, count: int, base_nll=None) -> dict:
    """``perplexity``, ``nll`` and ``tokens`` of a summed NLL over ``count`` tokens; with ``base_nll`` (the base
    model's mean NLL on the same items) also ``perplexity_change``, relative: +0.01 is 1% above the base model."""
    nll = total / max(count, 1)
    out = {"perplexity": math.exp(nll), "nll": nll, "tokens": count}
    if base_nll is not None:
        out["perplexity_change"] = math.exp(nll - base_nll) - 1
    return out


def rate_fields(key: str, k: int, n: int, confidence: float = 0.95) -> dict:
    """``key`` (k / n) with its exact interval ``key_ci95``, ``key_count`` and ``key_n``."""
    lo, hi = clopper_pearson(k, n, confidence)
    return {key: k / n, f"{key}_ci95": [lo, hi], f"{key}_count": k, f"{key}_n": n}


def outcome_rates(outcomes: Sequence[Outcome], key: str = "refusal_rate", confidence: float = 0.95) -> dict:
    """The three outcomes of judged replies as rates: ``key`` for refusals (``refusal_rate``, ``over_refusal_rate``,
    ``harmless_refusal_rate``) and the same prefix for ``degenerate_rate`` and ``answered_rate``."""
    prefix = key[: -len("refusal_rate")]  # "", "over_" or "harmless_"
    names = {Outcome.REFUSED: key, Outcome.DEGENERATE: f"{prefix}degenerate_rate",
             Outcome.ANSWERED: f"{prefix}answered_rate"}
    out = {}
    for outcome in OUTCOMES:
        out.update(rate_fields(names[outcome], sum(o is outcome for o in outcomes), len(outcomes), confidence))
    out[f"{key}_refused"] = out[f"{key}_count"]
    return out


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval for a rate of ``k`` in ``n``."""
    if n <= 0:
        raise ValueError("n must be positive")
    alpha = 1 - confidence
    lo = 0.0 if k == 0 else _beta_ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else _beta_ppf(1 - alpha / 2, k + 1, n - k)
    return lo, hi


def _beta_ppf(q: float, a: float, b: float) -> float:
    # Bisection on the regularized incomplete beta (torch.special has no betainc; this avoids scipy).
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes, 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        d = 1.0 / d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        f *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * (f - 1.0) / a


def paired_difference(before: Sequence[bool], after: Sequence[bool], confidence: float = 0.95,
                      draws: int = 10_000, seed: int = 0) -> dict:
    """The change in pass rate from ``before`` to ``after`` on the same items (paired outcomes), with a paired
    bootstrap percentile interval (items resampled together, seeded) and the exact two-sided McNemar p-value
    (a binomial test on the items that flipped; ties in neither direction give 1.0)."""
    import torch

    if len(before) != len(after) or not before:
        raise ValueError("paired outcomes need the same, non-zero number of items")
    diff = torch.tensor([float(a) - float(b) for b, a in zip(before, after)], dtype=torch.float64)
    rows = torch.randint(len(diff), (draws, len(diff)), generator=torch.Generator().manual_seed(seed))
    means = diff[rows].mean(1)
    alpha = (1 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    gained = sum(a and not b for b, a in zip(before, after))
    lost = sum(b and not a for b, a in zip(before, after))
    flips, low = gained + lost, min(gained, lost)
    p = min(1.0, 2 * sum(math.comb(flips, i) for i in range(low + 1)) / 2 ** flips) if flips else 1.0
    return {"difference": float(diff.mean()), "ci95": [lo, hi], "gained": gained, "lost": lost, "mcnemar_p": p}

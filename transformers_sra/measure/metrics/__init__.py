"""Metrics: plain functions (``core``) and one offline `evaluate.Metric` per file (``perplexity`` is the function;
the `Perplexity` metric lives in ``text_perplexity.py``). The classes load `evaluate` on first use;
the package's own evaluation path counts with ``core`` and never needs them.

Each metric class works without the Hub: instantiate it, or ``evaluate.load`` its file path::

    from transformers_sra.measure.metrics import RefusalRate
    RefusalRate().compute(predictions=replies)            # {"refusal_rate": 0.04, "refusal_rate_ci95": [...], ...}
    evaluate.load(transformers_sra.measure.metrics.refusal_rate.__file__)

Replies come from `judge.generate`; the model-based metrics (refusal score, first-token KL, perplexity)
take ``model=`` and ``tokenizer=`` as compute arguments.
"""

from ...signals.nll import answer_nll, chunk_token_ids, token_nll
from .core import clopper_pearson, nll_result, outcome_rates, paired_difference, perplexity, rate_fields

# the `evaluate.Metric` classes, imported on first use: `evaluate` and `datasets` load only for them
_METRICS = {"AnswerPerplexity": "answer_perplexity", "FirstTokenKL": "first_token_kl",
            "HarmlessOutcomes": "over_refusal_rate", "OverRefusalRate": "over_refusal_rate", "PassRate": "pass_rate",
            "Perplexity": "text_perplexity", "RefusalRate": "refusal_rate", "RefusalScore": "refusal_score"}

__all__ = [*_METRICS, "answer_nll", "chunk_token_ids", "clopper_pearson", "nll_result", "outcome_rates",
           "paired_difference", "perplexity", "rate_fields", "token_nll"]


def __getattr__(name: str):
    if name not in _METRICS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_METRICS[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_METRICS))

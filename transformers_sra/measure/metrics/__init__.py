"""Metrics: plain functions (``core``) and one offline `evaluate.Metric` per file (``perplexity`` is the function;
the `Perplexity` metric lives in ``text_perplexity.py``).

Each metric class works without the Hub: instantiate it, or ``evaluate.load`` its file path::

    from transformers_sra.measure.metrics import RefusalRate
    RefusalRate().compute(predictions=replies)            # {"refusal_rate": 0.04, "refusal_rate_ci95": [...], ...}
    evaluate.load(transformers_sra.measure.metrics.refusal_rate.__file__)

Replies come from `judge.generate`; the model-based metrics (refusal score, first-token KL, perplexity)
take ``model=`` and ``tokenizer=`` as compute arguments.
"""

from ...signals.nll import answer_nll, chunk_token_ids, token_nll
from .answer_perplexity import AnswerPerplexity
from .core import clopper_pearson, paired_difference, perplexity
from .first_token_kl import FirstTokenKL
from .over_refusal_rate import HarmlessOutcomes, OverRefusalRate
from .pass_rate import PassRate
from .refusal_rate import RefusalRate
from .refusal_score import RefusalScore
from .text_perplexity import Perplexity

__all__ = ["AnswerPerplexity", "FirstTokenKL", "HarmlessOutcomes", "OverRefusalRate", "PassRate", "Perplexity", "RefusalRate",
           "RefusalScore", "answer_nll", "chunk_token_ids", "clopper_pearson", "paired_difference", "perplexity", "token_nll"]

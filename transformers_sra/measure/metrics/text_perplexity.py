"""`Perplexity`: exp(mean next-token NLL) of plain text, and its change against the base model."""

from __future__ import annotations

from transformers_sra.measure.metrics import _base  # a module, so evaluate.load finds this file's class first
from transformers_sra.measure.metrics.core import nll_result
from transformers_sra.signals.nll import token_nll


class Perplexity(_base.StringMetric):
    description = "exp(mean next-token NLL) of plain text (no chat template); with base_nll also the relative change."
    inputs = ("predictions: texts. model, tokenizer: the model to score. base_nll: the base model's mean NLL on the "
              "same texts, for perplexity_change.")

    def _compute(self, predictions, model=None, tokenizer=None, base_nll=None, batch_size: int = 8,
                 max_length: int = 256):
        total, count = token_nll(model, tokenizer, predictions, max_length=max_length, batch_size=batch_size)
        return nll_result(total, count, base_nll)


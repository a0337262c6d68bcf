"""`AnswerPerplexity`: teacher-forced perplexity of reference answers (worked math, code) given their prompts."""

from __future__ import annotations

from transformers_sra.measure.metrics import _base  # a module, so evaluate.load finds this file's class first
from transformers_sra.measure.metrics.core import nll_result
from transformers_sra.signals.nll import answer_nll


class AnswerPerplexity(_base.StringMetric):
    description = ("exp(mean NLL) of the reference answer's tokens only, each read after its chat-formatted prompt: "
                   "how well the model still predicts a worked solution or a reference program.")
    inputs = ("predictions: reference answers. references: their prompts. model, tokenizer; base_nll: the base "
              "model's mean NLL on the same pairs, for perplexity_change.")
    with_references = True

    def _compute(self, predictions, references, model=None, tokenizer=None, base_nll=None, batch_size: int = 8,
                 max_length: int = 512, system_prompt=None):
        total, count = answer_nll(model, tokenizer, list(zip(references, predictions)), max_length=max_length,
                                  batch_size=batch_size, system_prompt=system_prompt)
        return nll_result(total, count, base_nll)

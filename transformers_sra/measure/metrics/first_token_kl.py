"""`FirstTokenKL`: mean KL(base ‖ edited) of the first reply token's distribution."""

from __future__ import annotations

from transformers_sra.measure.metrics import _base  # a module, so evaluate.load finds this file's class first
from transformers_sra.signals.logprobs import first_token_kl, first_token_logprobs


class FirstTokenKL(_base.StringMetric):
    description = "Mean over prompts of KL(base || model) of the first response token, from full log-softmax rows."
    inputs = ("predictions: prompts (strings). model, tokenizer: the edited model, or logprobs: its first-token "
              "log-probabilities, already computed. base_logprobs: the base model's (n_prompts, vocab) first-token "
              "log-probabilities on the same prompts (judge.first_token_logprobs).")

    def _compute(self, predictions, model=None, tokenizer=None, base_logprobs=None, logprobs=None,
                 batch_size: int = 16, system_prompt=None):
        if base_logprobs is None or len(base_logprobs) != len(predictions):
            raise ValueError("base_logprobs must hold the base model's first-token log-probabilities, one row per prompt")
        if logprobs is None:
            logprobs = first_token_logprobs(model, tokenizer, predictions, batch_size=batch_size,
                                            system_prompt=system_prompt)
        return {"first_token_kl": first_token_kl(base_logprobs, logprobs)}

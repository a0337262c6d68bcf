"""`RefusalRate`: the three outcomes of judged replies (refused, degenerate, answered), each with its exact interval."""

from __future__ import annotations

from transformers_sra.measure.metrics import _base  # a module, so evaluate.load finds this file's class first
from transformers_sra.measure.metrics.core import outcome_rates
from transformers_sra.signals.judge import resolve_classifier


class RefusalRate(_base.StringMetric):
    description = ("Share of model replies judged refusals (judge.classify unless judge= is given), with the shares "
                   "of degenerate replies (loops, empty) and answers; Clopper-Pearson intervals.")
    inputs = ("predictions: the model's replies (strings). judge: None, a str -> bool callable or a local classifier "
              "path. confidence: interval level, default 0.95.")
    key = "refusal_rate"

    def _compute(self, predictions, judge=None, confidence: float = 0.95):
        classify_reply = resolve_classifier(judge)
        return outcome_rates([classify_reply(r) for r in predictions], self.key, confidence)

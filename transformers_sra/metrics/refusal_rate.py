"""`RefusalRate`: share of replies the project's one judge calls refusals, with a Clopper–Pearson interval."""

from __future__ import annotations

from transformers_sra.judge import resolve_judge
from transformers_sra.metrics import _base  # a module, so evaluate.load finds this file's class first
from transformers_sra.metrics.core import clopper_pearson


class RefusalRate(_base.StringMetric):
    description = "Share of model replies judged refusals (judge.is_refusal unless judge= is given), exact CI."
    inputs = ("predictions: the model's replies (strings). judge: None, a str -> bool callable or a local classifier "
              "path. confidence: interval level, default 0.95.")
    key = "refusal_rate"

    def _compute(self, predictions, judge=None, confidence: float = 0.95):
        judge = resolve_judge(judge)
        k, n = sum(bool(judge(r)) for r in predictions), len(predictions)
        lo, hi = clopper_pearson(k, n, confidence)
        return {self.key: k / n, f"{self.key}_ci95": [lo, hi], f"{self.key}_refused": k, f"{self.key}_n": n}

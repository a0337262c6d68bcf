"""`RefusalRate`: the three outcomes of judged replies (refused, degenerate, answered), each with its exact interval."""

from __future__ import annotations

from transformers_sra.measure.metrics import _base  # a module, so evaluate.load finds this file's class first
from transformers_sra.measure.metrics.core import clopper_pearson
from transformers_sra.signals.judge import OUTCOMES, Outcome, resolve_classifier


class RefusalRate(_base.StringMetric):
    description = ("Share of model replies judged refusals (judge.classify unless judge= is given), with the shares "
                   "of degenerate replies (loops, empty) and answers; Clopper-Pearson intervals.")
    inputs = ("predictions: the model's replies (strings). judge: None, a str -> bool callable or a local classifier "
              "path. confidence: interval level, default 0.95.")
    key = "refusal_rate"

    def _compute(self, predictions, judge=None, confidence: float = 0.95):
        classify_reply = resolve_classifier(judge)
        outcomes = [classify_reply(r) for r in predictions]
        n = len(outcomes)
        prefix = self.key[: -len("refusal_rate")]  # "" or "over_"
        names = {Outcome.REFUSED: self.key, Outcome.DEGENERATE: f"{prefix}degenerate_rate",
                 Outcome.ANSWERED: f"{prefix}answered_rate"}
        out = {}
        for outcome in OUTCOMES:
            k = sum(o is outcome for o in outcomes)
            lo, hi = clopper_pearson(k, n, confidence)
            out.update({names[outcome]: k / n, f"{names[outcome]}_ci95": [lo, hi], f"{names[outcome]}_count": k,
                        f"{names[outcome]}_n": n})
        out[f"{self.key}_refused"] = out[f"{self.key}_count"]
        return out

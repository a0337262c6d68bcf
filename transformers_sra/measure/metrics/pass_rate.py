"""`PassRate`: the share of programs whose tests pass when run in the sandbox (pass@1 for one greedy sample per
problem), with its exact interval. Running them is opt-in, as with ``evaluate``'s ``code_eval``."""

from __future__ import annotations

from transformers_sra.measure.metrics import _base  # a module, so evaluate.load finds this file's class first
from transformers_sra.measure.tasks import run_tests


class PassRate(_base.StringMetric):
    description = ("pass@1 of one completion per problem: each program (prediction) is run with its tests "
                   "(reference) in a separate, time- and resource-limited process (transformers_sra.measure.sandbox); "
                   "Clopper-Pearson interval. Executes model-written code: needs allow_code_execution=True or "
                   "HF_ALLOW_CODE_EVAL=1.")
    inputs = ("predictions: programs (the prompt and its completion). references: their test code, run after the "
              "program. allow_code_execution: opt in. timeout: seconds per program, default 3. workers: parallel "
              "programs, default the CPU count.")
    with_references = True

    def _compute(self, predictions, references, allow_code_execution: bool = False, timeout: float = 3.0,
                 workers=None, confidence: float = 0.95):
        return run_tests(predictions, references, allow_code_execution=allow_code_execution, timeout=timeout,
                         workers=workers, confidence=confidence)

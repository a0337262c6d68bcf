"""What every metric here shares: an in-memory `evaluate.Metric` whose inputs are strings."""

from __future__ import annotations

import datasets
import evaluate

_CITATION = """@article{sra2026, title={Surgical Refusal Ablation}, journal={arXiv:2601.08489}, year={2026}}"""


class StringMetric(evaluate.Metric):
    """Subclasses set ``description`` and ``inputs`` and implement ``_compute``."""

    description = ""
    inputs = ""
    with_references = False  # inputs are (prediction, reference) string pairs

    def __init__(self, **kwargs):
        kwargs.setdefault("keep_in_memory", True)  # no arrow files on disk for a few hundred strings
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        plain = datasets.Features({"predictions": datasets.Value("string")})
        paired = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})
        return evaluate.MetricInfo(description=self.description, citation=_CITATION, inputs_description=self.inputs,
                                   features=paired if self.with_references else plain)

"""The edited model against its base and the baselines: `evaluate_edit` measures SRA's edit and each baseline
(`labels.BASELINES`, swapped in as real bakes by `method.baselines.swapped_edit`) through the one evaluation path,
`evaluation.evaluate_model`, and stores everything in ``report.metrics``::

    base = cached_evaluation(model, tokenizer)              # before apply_surgical_ablation
    report = apply_surgical_ablation(model, tokenizer)
    evaluate_edit(model, tokenizer, report, base)           # fills report.metrics: base / sra / standard
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from torch import nn

from ..labels import DESCRIPTIONS
from ..method.baselines import swapped_edit
from ..signals.judge import judge_summary
from .evaluation import EvalOptions, EvalSets, Evaluation, Progress, evaluate_model


def evaluate_edit(model: nn.Module, tokenizer, report, base: Evaluation, sets: Optional[EvalSets] = None, *,
                  baselines: Sequence[str] = ("standard",), baseline_sets: Optional[EvalSets] = None,
                  baseline_replies: bool = True, progress: Optional[Progress] = None,
                  options: Optional[EvalOptions] = None, **overrides) -> dict:
    """Measure the edited model and each of ``baselines`` (names from `baselines.BASELINES`) against ``base``
    through `evaluate_model` (the baselines on ``baseline_sets``, default ``sets``; with ``baseline_replies=False``
    their collateral numbers only, KLs and perplexities, without judged replies); store everything in
    ``report.metrics`` and return ``{"base", "sra", *baselines}`` `Evaluation` objects."""
    sets = sets or EvalSets.default()
    o = dataclasses.replace(options or EvalOptions(), **overrides)
    stage = (lambda name: (lambda step, i, n: progress(f"{name}:{step}", i, n))) if progress else (lambda name: None)
    out = {"base": base, "sra": evaluate_model(model, tokenizer, sets, base=base, options=o, progress=stage("sra"))}
    others, other_options = baseline_sets or sets, o
    if not baseline_replies:
        others = dataclasses.replace(others, harmful=[], over_refusal=[])
        other_options = dataclasses.replace(o, judged_harmless=0)
    for name in baselines:
        with swapped_edit(model, report, name):
            out[name] = evaluate_model(model, tokenizer, others, base=base, options=other_options,
                                       progress=stage(name))
    report.metrics = {**{k: {**v.to_dict(), "description": DESCRIPTIONS.get(k, "")} for k, v in out.items()},
                      "sets": sets.sizes(), "sets_sha256": sets.fingerprint(), "judge": judge_summary(o.judge),
                      "max_new_tokens": o.max_new_tokens}
    return out

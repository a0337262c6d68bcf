"""The edited model against its base and the baselines: `evaluate_edit` measures SRA's edit and each baseline
(`labels.BASELINES`, swapped in as real bakes by `method.baselines.swapped_edit`) through the one evaluation path,
`evaluation.evaluate_model`, and stores everything in ``report.metrics``::

    base = cached_evaluation(model, tokenizer)              # before apply_surgical_ablation
    report = apply_surgical_ablation(model, tokenizer)
    evaluate_edit(model, tokenizer, report, base)           # fills report.metrics: base / sra / standard
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import nn

from ..labels import DESCRIPTIONS
from ..method.baselines import swapped_edit
from ..signals.judge import judge_summary
from .evaluation import EvalOptions, EvalSets, Evaluation, Progress, evaluate_model


@dataclass(frozen=True)
class BaselineRuns:
    """Which baselines `evaluate_edit` measures beside SRA's edit, and on what."""

    names: Sequence[str] = ("standard",)  # from `labels.BASELINES`
    sets: Optional[EvalSets] = None  # default: the edit's own sets
    replies: bool = True  # False: their collateral numbers only (KLs and perplexities), no judged replies


def evaluate_edit(model: nn.Module, tokenizer, report, base: Evaluation, sets: Optional[EvalSets] = None, *,
                  baselines: Union[BaselineRuns, Sequence[str]] = BaselineRuns(), progress: Optional[Progress] = None,
                  options: Optional[EvalOptions] = None, **overrides) -> dict:
    """Measure the edited model and each baseline of ``baselines`` (`BaselineRuns`, or just their names) against
    ``base`` through `evaluate_model`, measured as ``options`` says (any field overridden by keyword); store
    everything in ``report.metrics`` and return ``{"base", "sra", *baselines}`` `Evaluation` objects."""
    runs = baselines if isinstance(baselines, BaselineRuns) else BaselineRuns(tuple(baselines))
    sets = sets or EvalSets.default()
    o = dataclasses.replace(options or EvalOptions(), **overrides)
    stage = (lambda name: (lambda step, i, n: progress(f"{name}:{step}", i, n))) if progress else (lambda name: None)
    out = {"base": base, "sra": evaluate_model(model, tokenizer, sets, base=base, options=o, progress=stage("sra"))}
    others, other_options = runs.sets or sets, o
    if not runs.replies:
        others = dataclasses.replace(others, harmful=[], over_refusal=[])
        other_options = dataclasses.replace(o, judged_harmless=0)
    for name in runs.names:
        with swapped_edit(model, report, name):
            out[name] = evaluate_model(model, tokenizer, others, base=base, options=other_options,
                                       progress=stage(name))
    report.metrics = {**{k: {**v.to_dict(), "description": DESCRIPTIONS.get(k, "")} for k, v in out.items()},
                      "sets": sets.sizes(), "sets_sha256": sets.fingerprint(), "judge": judge_summary(o.judge),
                      "max_new_tokens": o.max_new_tokens}
    return out

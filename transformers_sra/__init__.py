"""transformers-sra: Surgical Refusal Ablation for Hugging Face Transformers.

::

    from transformers_sra import SRAConfig, apply_surgical_ablation
    report = apply_surgical_ablation(model, tokenizer, SRAConfig())   # edits the model in place

Every public name below loads its module on first use, so ``import transformers_sra`` costs almost nothing and
a weight edit never loads `evaluate` or `datasets`. The layers (``models``, ``signals``, ``method``, ``measure``,
``publish``, ``cli``) are drawn in docs/architecture.md; the module paths of 0.1 still import, with a warning.
"""

from __future__ import annotations

import importlib

from . import _moved
from ._version import __version__

_moved.install()

# public name -> the module that defines it
_API = {
    "AtomRegistry": "method.atoms", "ConceptAtom": "method.atoms",
    "BakeHandle": "method.editing", "bake_direction": "method.editing",
    "ConfigError": "errors", "DemoModelError": "errors", "NumericsError": "errors", "PromptSetError": "errors",
    "SRAError": "errors", "UndoError": "errors", "UnsupportedModelError": "errors",
    "EvalOptions": "measure.evaluation",
    "EvalSets": "measure.evaluation", "Evaluation": "measure.evaluation", "evaluate_model": "measure.evaluation",
    "cached_evaluation": "measure.evaluation", "evaluate_edit": "measure.compare",
    "SRAConfig": "config", "SRAReport": "report", "StrengthProfile": "strength",
    "apply_surgical_ablation": "method.pipeline", "export_adapter": "publish.adapter",
    "init_distributed": "distributed", "is_main_process": "distributed",
    "load_corpus": "prompts", "load_prompts": "prompts", "load_demo_model": "demo",
    "CardOrigin": "publish.hub", "push_cleaned": "publish.hub", "save_cleaned": "publish.hub", "stream_bake": "publish.bake",
    "record_residuals": "method.extraction", "ridge_residualize": "method.residualize",
}

__all__ = [
    "__version__",
    "AtomRegistry",
    "BakeHandle",
    "CardOrigin",
    "ConceptAtom",
    "ConfigError",
    "DemoModelError",
    "EvalOptions",
    "EvalSets",
    "Evaluation",
    "NumericsError",
    "PromptSetError",
    "SRAConfig",
    "SRAError",
    "SRAReport",
    "StrengthProfile",
    "UndoError",
    "UnsupportedModelError",
    "apply_surgical_ablation",
    "bake_direction",
    "cached_evaluation",
    "evaluate_edit",
    "evaluate_model",
    "export_adapter",
    "init_distributed",
    "is_main_process",
    "load_corpus",
    "load_demo_model",
    "load_prompts",
    "push_cleaned",
    "record_residuals",
    "ridge_residualize",
    "save_cleaned",
    "stream_bake",
]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    if name in _moved.MOVED:  # transformers_sra.evaluation and the other paths of 0.1
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


"""transformers-sra: Surgical Refusal Ablation for Hugging Face Transformers.

::

    from transformers_sra import SRAConfig, apply_surgical_ablation
    report = apply_surgical_ablation(model, tokenizer, SRAConfig())   # edits the model in place
"""

from ._version import __version__
from .config import SRAConfig
from .demo import load_demo_model
from .distributed import init_distributed, is_main_process
from .errors import ConfigError, DemoModelError, NumericsError, PromptSetError, SRAError, UndoError, UnsupportedModelError
from .measure.evaluation import EvalSets, Evaluation, evaluate_model
from .method.atoms import AtomRegistry, ConceptAtom
from .method.editing import BakeHandle, bake_direction
from .method.extraction import record_residuals
from .method.pipeline import apply_surgical_ablation
from .method.residualize import ridge_residualize
from .prompts import load_corpus, load_prompts
from .publish.adapter import export_adapter
from .publish.bake import stream_bake
from .publish.hub import push_cleaned, save_cleaned
from .report import SRAReport
from .strength import StrengthProfile

__all__ = [
    "__version__",
    "AtomRegistry",
    "BakeHandle",
    "ConceptAtom",
    "ConfigError",
    "DemoModelError",
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

"""transformers-sra: Surgical Refusal Ablation for Hugging Face Transformers.

::

    from transformers_sra import SRAConfig, apply_surgical_ablation
    report = apply_surgical_ablation(model, tokenizer, SRAConfig())   # edits the model in place
"""

from ._version import __version__
from .adapter import export_adapter
from .atoms import AtomRegistry, ConceptAtom
from .config import SRAConfig
from .demo import load_demo_model
from .distributed import init_distributed, is_main_process
from .editing import BakeHandle, bake_direction
from .errors import ConfigError, DemoModelError, NumericsError, PromptSetError, SRAError, UndoError, UnsupportedModelError
from .evaluation import EvalSets, Evaluation, evaluate_model
from .extraction import record_residuals
from .hub import push_cleaned, save_cleaned
from .pipeline import apply_surgical_ablation
from .profile import StrengthProfile
from .prompts import load_corpus, load_prompts
from .report import SRAReport
from .residualize import ridge_residualize
from .streaming import stream_bake

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

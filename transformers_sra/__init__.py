"""transformers-sra: Surgical Refusal Ablation for Hugging Face Transformers.

::

    from transformers_sra import SRAConfig, apply_surgical_ablation
    report = apply_surgical_ablation(model, tokenizer, SRAConfig())   # edits the model in place
"""

from .atoms import AtomRegistry, ConceptAtom
from .config import SRAConfig
from .demo import load_demo_model
from .editing import BakeHandle, bake_direction
from .errors import ConfigError, DemoModelError, PromptSetError, SRAError, UnsupportedModelError
from .extraction import record_residuals
from .evaluation import EvalSets, Evaluation, evaluate_model
from .hub import push_cleaned, save_cleaned
from .pipeline import apply_surgical_ablation
from .profile import StrengthProfile
from .prompts import load_corpus, load_prompts
from .report import SRAReport
from .residualize import ridge_residualize
from .streaming import stream_bake

__version__ = "0.1.0"

__all__ = [
    "AtomRegistry",
    "BakeHandle",
    "ConceptAtom",
    "ConfigError",
    "DemoModelError",
    "EvalSets",
    "Evaluation",
    "PromptSetError",
    "SRAConfig",
    "SRAError",
    "SRAReport",
    "StrengthProfile",
    "UnsupportedModelError",
    "apply_surgical_ablation",
    "bake_direction",
    "evaluate_model",
    "load_corpus",
    "load_demo_model",
    "load_prompts",
    "push_cleaned",
    "record_residuals",
    "ridge_residualize",
    "save_cleaned",
    "stream_bake",
]

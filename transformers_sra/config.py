"""`SRAConfig`: every knob of Surgical Refusal Ablation, validated on construction.

Saved and loaded peft-style as ``sra_config.json``::

    config = SRAConfig(strength=0.9, iterations=2)
    config.save_pretrained("out/")
    assert SRAConfig.from_pretrained("out/") == config
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import ConfigError

CONFIG_NAME = "sra_config.json"

#: A prompt set: the name of a set shipped in ``transformers_sra/prompts``, a file path, or a list of strings.
PromptSource = Union[str, list]

PROMPT_FIELDS = ("harmful_prompts", "harmless_prompts", "harmful_val_prompts", "harmless_val_prompts", "neutral_prompts")
AUTO = "auto"

DEFAULT_ATOMS = (
    "math", "coding", "logic",  # Shields
    "style_length", "style_register", "style_mood", "style_format",  # Confounds
    "deception", "privacy",  # Targets
)


@dataclass(frozen=True)
class Budgets:
    """The capability budgets every candidate edit must keep: first-token KL and relative perplexity change."""

    max_kl: float
    max_ppl_increase: float

    def allows(self, row: dict) -> bool:
        """``row["kl"] ≤ max_kl`` and ``row["ppl_change"] ≤ max_ppl_increase``; an unmeasured ΔPPL (None) is not allowed."""
        ppl = row.get("ppl_change")
        return row["kl"] <= self.max_kl and ppl is not None and ppl <= self.max_ppl_increase


@dataclass
class SRAConfig:
    """Configuration of `apply_surgical_ablation`. Every field has a default that works on an instruct model."""

    harmful_prompts: PromptSource = field(
        default="harmful_train", metadata={"help": "Harmful requests used to measure the refusal direction and for mining."}
    )
    harmless_prompts: PromptSource = field(
        default="harmless_train", metadata={"help": "Harmless instructions contrasted with the harmful set."}
    )
    harmful_val_prompts: PromptSource = field(
        default="harmful_val", metadata={"help": "Held-out harmful requests that score candidate layers."}
    )
    harmless_val_prompts: PromptSource = field(
        default="harmless_val", metadata={"help": "Held-out harmless instructions for the KL side of layer scoring."}
    )
    neutral_prompts: PromptSource = field(
        default="neutral", metadata={"help": "Neutral reference set that atoms without their own contrast are measured against."}
    )
    atoms: tuple = field(
        default=DEFAULT_ATOMS,
        metadata={"help": "Names of registered concept atoms to use (shipped: math, coding, logic, style_*, deception, "
                  "privacy)."},
    )
    custom_atoms: dict = field(
        default_factory=dict,
        metadata={
            "help": "Extra atoms: {name: {'role': 'shield'|'confound'|'target', 'prompts': source, "
            "'contrast': source (optional, default neutral), 'rank': int (optional)}}."
        },
    )
    atom_rank: int = field(default=1, metadata={"help": "Spectral rank k of each atom's subspace (1 = a single direction)."})
    positions: tuple = field(
        default=(-1,), metadata={"help": "Prompt token positions to read, counted from the end (-1 = last prompt token)."}
    )
    direction_layer: Optional[int] = field(
        default=None, metadata={"help": "Layer whose activations define the direction; None lets the search choose."}
    )
    candidate_layers: Optional[list] = field(
        default=None, metadata={"help": "Direction layers the search scores; None = 50%..70% of depth."}
    )
    layers: Optional[list] = field(
        default=None, metadata={"help": "Decoder layers whose writers are baked; None = all."}
    )
    ridge_lambda: float = field(
        default=0.01, metadata={"help": "Ridge λ in r − A(AᵀA+λI)⁻¹Aᵀr over unit atom columns; 0 = exact projection."}
    )
    projected: bool = field(
        default=False,
        metadata={"help": "Make the dirty direction orthogonal to the mean harmless activation before residualizing."},
    )
    filter_prompts: bool = field(
        default=True,
        metadata={"help": "Measure the direction from the harmful training prompts the base model refuses and the "
                  "harmless ones it answers (first-token refusal score above / below 0.5), so it reads refusal "
                  "rather than topic; a set left with fewer than 16 prompts is used whole."},
    )
    text_corpus: PromptSource = field(
        default="general_val",
        metadata={"help": "Plain text (shipped corpus name, .txt with blank-line passages, or a file of records): "
                  "even passages give the fluency Shield, odd ones the perplexity budget."},
    )
    fluency_rank: Union[int, str] = field(
        default="auto",
        metadata={"help": "Rank of the fluency Shield (top principal components of residuals on plain text) "
                  "regressed out with the atoms; 'auto' lets the search choose among fluency_ranks."},
    )
    fluency_ranks: tuple = field(default=(128, 64), metadata={"help": "Fluency Shield ranks the search tries (first = start)."})
    strength: Union[float, dict, str] = field(
        default="auto",
        metadata={"help": "γ in W ← W − γ u(uᵀW): a number (flat), a profile {peak, floor, center, width, attn, mlp} "
                  "as JSON, or 'auto' to let the search choose a profile."},
    )
    norm_preserving: bool = field(
        default=False,
        metadata={"help": "Norm-preserving bake: after the projection, rescale each edited weight's hidden-size "
                  "vectors back to their original norms (biases are only projected)."},
    )
    iterations: int = field(
        default=0, metadata={"help": "Hard-negative mining passes after the first bake (0 disables mining): each judges "
                             "short replies to the training prompts and removes a direction built from those still refused."}
    )
    mining_contrast: str = field(
        default="answered",
        metadata={"help": "What mining contrasts the still-refused training prompts with: 'answered' (the harmful "
                  "prompts the edited model now answers: same topics, refusal alone) or 'harmless'."},
    )
    max_kl: float = field(
        default=0.05,
        metadata={"help": "Budget on mean first-token KL(base || edited) on the held-out harmless prompts; the search "
                  "and every mined pass must stay within it."},
    )
    max_ppl_increase: float = field(
        default=0.005, metadata={"help": "Budget on the relative perplexity increase on the held-back text (0.005 = +0.5%)."}
    )
    judge: Optional[str] = field(
        default=None,
        metadata={"help": "Refusal judge: None = the shipped phrase judge, or a local text-classification model folder."}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per prompt when judging refusals."})
    system_prompt: Optional[str] = field(default=None, metadata={"help": "System message for the chat template, if any."})
    seed: int = field(default=0, metadata={"help": "Seed for anything random (none of the default steps are)."})

    def __post_init__(self) -> None:
        for name in PROMPT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)):
                from .prompts import load_prompts  # turns a datasets.Dataset or any iterable into a plain list

                setattr(self, name, load_prompts(value))
            elif isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        self.atoms = tuple(self.atoms)
        self.fluency_ranks = tuple(int(r) for r in self.fluency_ranks)
        self.strength = _parse_strength(self.strength)
        if isinstance(self.fluency_rank, str) and self.fluency_rank != AUTO:
            self.fluency_rank = _parse_int(self.fluency_rank, "fluency_rank")
        self.positions = tuple(int(p) for p in self.positions)
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.ridge_lambda >= 0, f"ridge_lambda must be >= 0, got {self.ridge_lambda}")
        if self.strength != AUTO:
            from .profile import StrengthProfile

            StrengthProfile.parse(self.strength)  # raises ConfigError with the reason
        need(self.fluency_rank == AUTO or (isinstance(self.fluency_rank, int) and self.fluency_rank >= 0),
             f"fluency_rank must be 'auto' or an int >= 0, got {self.fluency_rank!r}")
        need(len(self.fluency_ranks) > 0 and all(r >= 0 for r in self.fluency_ranks),
             f"fluency_ranks must be non-empty ints >= 0, got {self.fluency_ranks}")
        need(self.max_ppl_increase >= 0, f"max_ppl_increase must be >= 0, got {self.max_ppl_increase}")
        need(isinstance(self.iterations, int) and self.iterations >= 0,
             f"iterations must be an int >= 0, got {self.iterations!r}")
        need(self.mining_contrast in ("answered", "harmless"),
             f"mining_contrast must be 'answered' or 'harmless', got {self.mining_contrast!r}")
        need(isinstance(self.atom_rank, int) and self.atom_rank >= 1, f"atom_rank must be an int >= 1, got {self.atom_rank!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch_size must be an int >= 1, got {self.batch_size!r}")
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        need(self.max_kl > 0, f"max_kl must be > 0, got {self.max_kl}")
        need(len(self.positions) > 0 and all(p < 0 for p in self.positions),
             f"positions are counted from the end of the prompt and must be negative, got {self.positions}")
        need(len(set(self.atoms)) == len(self.atoms), f"atoms has duplicates: {self.atoms}")
        for name, spec in self.custom_atoms.items():
            need(isinstance(spec, dict) and "prompts" in spec, f"custom atom {name!r} needs a dict with at least 'prompts'")
            need(spec.get("role", "shield") in ("shield", "confound", "target"),
                 f"custom atom {name!r}: role must be 'shield', 'confound' or 'target', got {spec.get('role')!r}")
        for name in ("layers", "candidate_layers"):
            value = getattr(self, name)
            need(value is None or (len(value) > 0 and all(isinstance(i, int) for i in value)),
                 f"{name} must be None or a non-empty list of layer indices, got {value!r}")

    @property
    def budgets(self) -> Budgets:
        return Budgets(self.max_kl, self.max_ppl_increase)

    def profile(self):
        """The fixed `StrengthProfile`, or None when the search chooses it."""
        from .profile import StrengthProfile

        return None if self.strength == AUTO else StrengthProfile.parse(self.strength)

    # -- serialization, peft-style -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists), so a saved and reloaded dict compares equal."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown SRAConfig fields {unknown}; check the spelling or upgrade transformers-sra")
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SRAConfig":
        path = os.path.join(directory, CONFIG_NAME) if os.path.isdir(directory) else os.fspath(directory)
        if not os.path.isfile(path):
            raise ConfigError(f"no {CONFIG_NAME} at {directory}; pass the folder written by SRAConfig.save_pretrained")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _parse_int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be 'auto' or an integer, got {value!r}") from None


def _parse_strength(value):
    """'auto', a number, a profile dict, or their text forms as they come from the command line."""
    if not isinstance(value, str) or value == AUTO:
        return value
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise ConfigError(f"strength must be 'auto', a number or a JSON profile, got {value!r}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"strength must be 'auto', a number or a JSON profile, got {value!r}")
    return parsed

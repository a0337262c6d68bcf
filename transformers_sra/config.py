"""`SRAConfig`: every knob of Surgical Refusal Ablation, validated on construction.

Saved and loaded peft-style as ``sra_config.json``::

    config = SRAConfig(strength=0.9, iterations=2)
    config.save_pretrained("out/")
    assert SRAConfig.from_pretrained("out/") == config
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import ConfigError
from .folders import write_text_atomic

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
    # Off by default: at 0.97 (chosen on training and atom sets, benchmarks/extraction_convergence.json) the demo
    # model's directions stay >= 0.998 of the full extraction's for 16% less work, yet extraction took longer
    # (choice_check-demo.json): the harmful set is read whole anyway and 32-prompt rounds batch worse than one pass
    extraction_cosine: Optional[float] = field(
        default=None,
        metadata={"help": "Read each training and atom set in a seeded order, 32 prompts a round, and stop once two "
                  "halves of what was read agree: the cosine between the halves' difference-of-means directions is "
                  "at least this at every candidate layer (each side of a contrast on its own; at least 16 rows "
                  "kept). None (default) or 1 reads every prompt in one pass. At 0.97 the demo model's extraction took "
                  "longer (rounds batch worse than one sorted pass), the 1.5B sibling's 30% less, same choice "
                  "(docs/performance.md)."},
    )
    extraction_subspace: Optional[float] = field(
        default=None,
        metadata={"help": "Read the fluency Shield's passages until the top-k principal subspaces (k = the largest "
                  "fluency rank) of two halves of them agree: mean squared cosine of their principal angles at "
                  "least this at every candidate layer. None or 1 reads every passage: on the demo model the halves "
                  "of all 19 passages agree only to 0.63 at rank 128, and stopping at 0.6 (16 passages) leaves the "
                  "clean direction at 0.975 of the full one (benchmarks/extraction_convergence.json)."},
    )
    text_corpus: PromptSource = field(
        default="general_val",
        metadata={"help": "Plain text (shipped corpus name, .txt with blank-line passages, or a file of records): "
                  "even passages give the fluency Shield, odd ones the perplexity budget."},
    )
    per_layer_directions: bool = field(
        default=True,
        metadata={"help": "Each layer after the direction layer removes its own clean direction (that layer's "
                  "difference of means, cleaned by the same atoms and fluency Shield); the layers up to it remove "
                  "the direction layer's. False removes the direction layer's direction everywhere (rank 1)."},
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
    judged_contenders: int = field(
        default=4, metadata={"help": "After the first-token screen, this many candidates within both budgets (lowest "
                             "refusal scores first) are ranked by judged replies to the harmful validation prompts; "
                             "0 or 1 keeps the screen's choice."}
    )
    judged_tokens: int = field(
        default=64, metadata={"help": "Reply length for judging the search's contenders (a settled refusal stops early)."}
    )
    screen_prompts: int = field(
        default=0,
        metadata={"help": "Score each search candidate first on this many prompts of each validation set and read the "
                  "rest only where 99% paired bounds cannot separate it: the choice of reading every prompt, for "
                  "fewer passes when many candidates are far apart (wide layer or profile grids). 0 (default) reads "
                  "every prompt: a 64-prompt screen separated none of the demo model's 10 candidates, 5 of the 1.5B "
                  "sibling's 11, same choice."},
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
    chat_template_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "Extra arguments for the tokenizer's chat template, e.g. {\"enable_thinking\": false} for Qwen3."},
    )
    max_prompt_tokens: int = field(
        default=512, metadata={"help": "Prompts longer than this many tokens are cut to it (with a warning)."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the run's own random state (the caller's generator is left as it was)."}
    )

    def __post_init__(self) -> None:
        for name in PROMPT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)):
                from .prompts import load_prompts  # turns a datasets.Dataset or any iterable into a plain list

                setattr(self, name, load_prompts(value))
            elif isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        # Normalize what the command line and JSON spell loosely; a value of the wrong kind is a ConfigError.
        with _field("atoms", "a list of atom names"):
            self.atoms = tuple(self.atoms) if not isinstance(self.atoms, str) else (self.atoms,)
        with _field("fluency_ranks", "a list of integers"):
            self.fluency_ranks = tuple(_as_int(r) for r in self.fluency_ranks)
        with _field("positions", "a list of negative integers"):
            self.positions = tuple(_as_int(p) for p in self.positions)
        self.strength = _parse_strength(self.strength)
        if isinstance(self.fluency_rank, str) and self.fluency_rank != AUTO:
            self.fluency_rank = _parse_int(self.fluency_rank, "fluency_rank")
        if isinstance(self.chat_template_kwargs, str):
            self.chat_template_kwargs = _parse_json(self.chat_template_kwargs, "chat_template_kwargs")
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            need(_is_int(value) and value >= low, f"{name} must be an int >= {low}, got {value!r}")

        def number(name: str, positive: bool = False) -> None:
            value = getattr(self, name)
            ok = _is_number(value) and math.isfinite(value) and (value > 0 if positive else value >= 0)
            need(ok, f"{name} must be {'>' if positive else '>='} 0 and finite, got {value!r}")

        number("ridge_lambda")
        number("max_ppl_increase")
        number("max_kl", positive=True)
        for name in ("iterations", "seed", "judged_contenders", "screen_prompts"):
            integer(name, 0)
        need(self.seed < 2**63, f"seed must be below 2**63, got {self.seed}")
        for name in ("projected", "filter_prompts", "norm_preserving"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("atom_rank", "batch_size", "max_new_tokens", "max_prompt_tokens", "judged_tokens"):
            integer(name, 1)
        if self.strength != AUTO:
            from .strength import StrengthProfile

            StrengthProfile.parse(self.strength)  # raises ConfigError with the reason
        need(self.fluency_rank == AUTO or (_is_int(self.fluency_rank) and self.fluency_rank >= 0),
             f"fluency_rank must be 'auto' or an int >= 0, got {self.fluency_rank!r}")
        need(len(self.fluency_ranks) > 0 and all(r >= 0 for r in self.fluency_ranks),
             f"fluency_ranks must be non-empty ints >= 0, got {self.fluency_ranks}")
        need(self.mining_contrast in ("answered", "harmless"),
             f"mining_contrast must be 'answered' or 'harmless', got {self.mining_contrast!r}")
        need(len(self.positions) > 0 and all(p < 0 for p in self.positions),
             f"positions are counted from the end of the prompt and must be negative, got {self.positions}")
        need(all(isinstance(a, str) for a in self.atoms), f"atoms must be atom names, got {self.atoms!r}")
        need(len(set(self.atoms)) == len(self.atoms), f"atoms has duplicates: {self.atoms}")
        need(isinstance(self.custom_atoms, dict), f"custom_atoms must be a dict {{name: spec}}, got {self.custom_atoms!r}")
        for name, spec in self.custom_atoms.items():
            need(isinstance(name, str) and name.strip() != "", f"custom atom names must be non-empty strings, got {name!r}")
            need(isinstance(spec, dict) and "prompts" in spec, f"custom atom {name!r} needs a dict with at least 'prompts'")
            need(spec.get("role", "shield") in ("shield", "confound", "target"),
                 f"custom atom {name!r}: role must be 'shield', 'confound' or 'target', got {spec.get('role')!r}")
            rank = spec.get("rank")
            need(rank is None or (_is_int(rank) and rank >= 1), f"custom atom {name!r}: rank must be an int >= 1, got {rank!r}")
        need(isinstance(self.chat_template_kwargs, dict) and all(isinstance(k, str) for k in self.chat_template_kwargs),
             f"chat_template_kwargs must be a dict of template arguments, got {self.chat_template_kwargs!r}")
        need(self.system_prompt is None or isinstance(self.system_prompt, str),
             f"system_prompt must be a string or None, got {self.system_prompt!r}")
        for name in ("extraction_cosine", "extraction_subspace"):
            value = getattr(self, name)
            need(value is None or (_is_number(value) and 0 < value <= 1),
                 f"{name} must be None or a number in (0, 1], got {value!r}")
        for name in ("layers", "candidate_layers"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(i) for i in value)),
                 f"{name} must be None or a non-empty list of layer indices, got {value!r}")
        need(self.direction_layer is None or _is_int(self.direction_layer),
             f"direction_layer must be None or a layer index, got {self.direction_layer!r}")

    @property
    def budgets(self) -> Budgets:
        return Budgets(self.max_kl, self.max_ppl_increase)

    @property
    def batching(self) -> dict:
        """How every pass over prompts is batched and chat-formatted: ``batch_size`` and ``system_prompt``."""
        return {"batch_size": self.batch_size, "system_prompt": self.system_prompt}

    def profile(self):
        """The fixed `StrengthProfile`, or None when the search chooses it."""
        from .strength import StrengthProfile

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
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SRAConfig":
        path = os.path.join(directory, CONFIG_NAME) if os.path.isdir(directory) else os.fspath(directory)
        if not os.path.isfile(path):
            raise ConfigError(f"no {CONFIG_NAME} at {directory}; pass the folder written by SRAConfig.save_pretrained")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


@contextmanager
def _field(name: str, expected: str):
    """Turn a conversion's TypeError/ValueError into a ConfigError that names the field."""
    try:
        yield
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must be {expected} ({err})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_int(value) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return int(value)


def _parse_json(value: str, name: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name} is not valid JSON ({err.msg} at column {err.colno})") from None


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

"""What a run reads, loaded and checked once: prompt sets by role, atoms, candidate layers, text passages.

Shared by `apply_surgical_ablation` and `audit_model`, so both check their inputs the same way before the
first forward pass::

    inputs = resolve_inputs(model, config, AtomRegistry.default())
    inputs.prompts("harmful_val")
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import SRAConfig
from ..errors import ConfigError
from ..models.architectures import decoder_layers, residual_writers
from ..prompts import load_corpus, load_prompts, remove_overlap, truncate_prompts
from .atoms import AtomRegistry, ConceptAtom
from .search import default_candidates


@dataclass
class RunInputs:
    """Everything a run reads, loaded and checked once."""

    texts: dict  # set key -> prompts
    sources: dict  # role ("harmful", "harmless", "harmful_val", "harmless_val", "neutral") -> set key
    atoms: list[ConceptAtom]
    layers: list[int]  # candidate direction layers
    fluency_text: list[str]  # passages for the fluency Shield
    budget_text: list[str]  # held-back passages for the perplexity budget
    later_layers: list[int]  # with per-layer directions, the other layers after the first candidate (each its own)

    def prompts(self, role: str) -> list[str]:
        return self.texts[self.sources[role]]

    def to_extract(self) -> set:
        # the validation sets are only scored, never extracted (unless they double as another set)
        keys = {self.sources[r] for r in ("harmful", "harmless", "neutral")}
        return keys | {set_key(s) for a in self.atoms for s in (a.prompts, a.contrast) if s is not None}


def set_key(source) -> object:
    """A hashable key for a prompt source (a set name, a path or a list of prompts)."""
    return source if isinstance(source, str) else tuple(source)


def resolve_inputs(model: nn.Module, config: SRAConfig, registry: AtomRegistry, tokenizer=None) -> RunInputs:
    """Load every prompt set, atom and passage of ``config`` and check the layers, before any forward pass.

    With ``tokenizer``, over-long prompts are cut to ``config.max_prompt_tokens`` (with a warning); prompts in both
    the harmful and the harmless set of a pair are removed from both (with a count)."""
    atoms = registry.select(config.atoms, config.custom_atoms)
    if not any(a.role in ("shield", "confound") for a in atoms):
        raise ConfigError("no shield or confound atoms selected; SRA needs at least one (use standard ablation otherwise)")
    sources = {"harmful": config.harmful_prompts, "harmless": config.harmless_prompts,
               "harmful_val": config.harmful_val_prompts, "harmless_val": config.harmless_val_prompts,
               "neutral": config.neutral_prompts}
    all_sources = list(sources.values()) + [s for a in atoms for s in (a.prompts, a.contrast) if s is not None]
    texts = {set_key(s): load_prompts(s) for s in all_sources}
    if tokenizer is not None:
        texts = {k: truncate_prompts(tokenizer, v, config.max_prompt_tokens) for k, v in texts.items()}
    for bad, good in (("harmful", "harmless"), ("harmful_val", "harmless_val")):
        keys = set_key(sources[bad]), set_key(sources[good])
        texts[keys[0]], texts[keys[1]], _ = remove_overlap(texts[keys[0]], texts[keys[1]])
    corpus = load_corpus(config.text_corpus)
    if len(corpus) < 2:
        raise ConfigError("text_corpus needs at least two passages: even ones feed the fluency Shield, odd ones the budget")
    n_layers = len(decoder_layers(model))
    residual_writers(model, config.layers)  # UnsupportedModelError now, not mid-bake
    for i in [config.direction_layer] + list(config.candidate_layers or []):
        if i is not None and not -n_layers <= i < n_layers:
            raise ConfigError(f"layer {i} is out of range: the model has {n_layers} decoder layers")
    if config.direction_layer is not None:
        layers = [config.direction_layer % n_layers]
    else:
        layers = sorted({i % n_layers for i in (config.candidate_layers or default_candidates(n_layers))})
    # every layer after the first candidate that is not one itself (between candidates too: no gap in the map)
    later = [i for i in range(layers[0] + 1, n_layers) if i not in layers] if config.per_layer_directions else []
    return RunInputs(texts, {k: set_key(v) for k, v in sources.items()}, atoms, layers, corpus[0::2], corpus[1::2],
                     later)

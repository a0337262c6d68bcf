"""Build the run's `directions.Directions` from the model: extraction, the behaviour filter, atom bases, the fluency
Shield.

The one step between `inputs.resolve_inputs` and the tensor-only `directions.Directions`; the pipeline and
the audit both call it (it was ``method/model_directions.py``)::

    dirs, kept = build_directions(model, tokenizer, inputs, config, extract, ranks=[0, 64])

Each set is read until its statistics converge (`convergence`: ``config.extraction_cosine`` and
``config.extraction_subspace``); ``dirs.reads`` says how many prompts each statistic used.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from ..config import SRAConfig
from ..signals.logprobs import refusal_probability, refusal_token_ids
from .atoms import atom_basis, principal_basis
from .convergence import Contrast, Recorded, SetReading, read_subspace, read_until_converged, rule_threshold
from .directions import Directions, select_by_behaviour
from .extraction import record_residuals, record_residuals_with_logprobs, record_token_residuals
from .inputs import RunInputs, set_key
from .residualize import difference_of_means


class ModelRecorder:
    """Records a run's sets from the model. ``prompts(key, indices)``: the residuals of set ``key``'s prompts at
    ``indices`` (candidate layers first, then the later layers for the training sets) and which of them the behaviour
    filter keeps; ``passages(indices)``: the fluency text's token residuals. A benchmark can replay its own."""

    def __init__(self, model, tokenizer, inputs: RunInputs, config: SRAConfig, extract: dict):
        self.model, self.tokenizer, self.inputs, self.config, self.extract = model, tokenizer, inputs, config, extract
        self.training = inputs.sources["harmful"], inputs.sources["harmless"]

    def prompts(self, key, indices: list[int]) -> Recorded:
        inputs = self.inputs
        # the training sets also give the later layers' own directions (per-layer directions)
        layers = inputs.layers + (inputs.later_layers if key in self.training else [])
        texts = [inputs.texts[key][i] for i in indices]
        kwargs = {**self.extract, "layers": layers}
        if not (self.config.filter_prompts and key in self.training):
            rows = record_residuals(self.model, self.tokenizer, texts, **kwargs)
            return rows, torch.ones(len(rows), dtype=torch.bool)
        # the same pass reads what the base model would answer: harmful prompts it refuses, harmless it answers
        rows, logprobs = record_residuals_with_logprobs(self.model, self.tokenizer, texts, **kwargs)
        refused = refusal_probability(logprobs, refusal_token_ids(self.tokenizer)) > 0.5
        return rows, refused if key == self.training[0] else ~refused

    def passages(self, indices: list[int]) -> torch.Tensor:
        return record_token_residuals(self.model, self.tokenizer, [self.inputs.fluency_text[i] for i in indices],
                                      layers=self.inputs.layers, batch_size=max(1, self.config.batch_size // 2))


def build_directions(model, tokenizer, inputs: RunInputs, config: SRAConfig, extract: dict, ranks: list[int],
                     recorder: Optional[ModelRecorder] = None) -> tuple[Directions, dict]:
    """Extract every set ``inputs`` needs (``extract``: layers, positions, batching) and build the `Directions`;
    returns them and how many harmful/harmless prompts the behaviour filter kept. ``recorder`` (default: a
    `ModelRecorder` of ``model``) supplies the rows."""
    recorder = recorder or ModelRecorder(model, tokenizer, inputs, config, extract)
    harmful, harmless, neutral = (inputs.sources[r] for r in ("harmful", "harmless", "neutral"))
    threshold = rule_threshold(config.extraction_cosine)
    seed = None if threshold is None else config.seed  # off: every set read whole, in its own order, as one pass
    # one order on every rank: a set's follows the hash seed
    readings = {key: SetReading(len(inputs.texts[key]), partial(recorder.prompts, key), seed)
                for key in sorted(inputs.to_extract(), key=repr)}
    contrasts = [Contrast("dirty", harmful, harmless)] + [
        Contrast(a.name, set_key(a.prompts), neutral if a.contrast is None else set_key(a.contrast), a.paired)
        for a in inputs.atoms]
    cosines = read_until_converged(readings, contrasts, threshold, len(inputs.layers))
    n = len(inputs.layers)
    every = {key: reading.rows() for key, reading in readings.items()}  # at the candidates and the later layers
    acts = {key: rows[:, :n] for key, rows in every.items()}
    kept = {"harmful": len(acts[harmful]), "harmless": len(acts[harmless])}
    if config.filter_prompts:
        (harmful_every, harmless_every), kept = select_by_behaviour(every[harmful], readings[harmful].keep(),
                                                                    every[harmless], readings[harmless].keep())
    else:
        harmful_every, harmless_every = every[harmful], every[harmless]
    harmful_acts, harmless_acts = harmful_every[:, :n], harmless_every[:, :n]
    bases = {}
    for c, atom in zip(contrasts[1:], inputs.atoms):
        first, second = acts[c.first], acts[c.second]
        if c.paired:  # line i against line i: the common prefix of the lockstep reading
            m = min(len(first), len(second))
            first, second = first[:m], second[:m]
        bases[atom.name] = atom_basis(first, second, atom.rank or config.atom_rank, atom.paired)
    fluency, fluency_read = None, {}
    if max(ranks) > 0:
        tokens, fluency_read = _fluency_tokens(recorder, len(inputs.fluency_text), max(ranks), config)
        fluency = principal_basis(tokens, min(max(ranks), tokens.shape[0] - 1))
    dirs = Directions.build(inputs.layers, harmful_acts, harmless_acts, bases,
                            [a.name for a in inputs.atoms if a.role in ("shield", "confound")], fluency,
                            config.ridge_lambda, projected=config.projected)
    dirs.unfiltered = difference_of_means(acts[harmful], acts[harmless])  # the field's standard ablation direction
    if inputs.later_layers:
        dirs.later = dict(zip(inputs.later_layers, difference_of_means(harmful_every[:, n:], harmless_every[:, n:])))
    dirs.reads = {"threshold": threshold, "subspace_threshold": rule_threshold(config.extraction_subspace),
                  "statistics": {c.name: _statistic(readings, c, cosines[c.name]) for c in contrasts},
                  "sets": {_label(inputs, key): reading.counts() for key, reading in readings.items()},
                  "fluency": fluency_read}
    return dirs, kept


def _fluency_tokens(recorder: ModelRecorder, size: int, rank: int, config: SRAConfig) -> tuple[torch.Tensor, dict]:
    threshold = rule_threshold(config.extraction_subspace)
    if threshold is None:  # every passage in one pass, in the corpus's order
        tokens = recorder.passages(list(range(size)))
        return tokens, {"passages": size, "available": size, "tokens": len(tokens), "agreement": None}
    return read_subspace(recorder.passages, size, rank, threshold, config.seed)


def _label(inputs: RunInputs, key) -> str:
    """A set's name in the report: its role (harmful, harmless, neutral), its own name, else the atom that reads it."""
    roles = {inputs.sources[r]: r for r in ("neutral", "harmless", "harmful")}
    named = {**{set_key(a.contrast): f"{a.name} contrast" for a in inputs.atoms if a.contrast is not None},
             **{set_key(a.prompts): a.name for a in inputs.atoms}}
    return roles.get(key) or (key if isinstance(key, str) else named.get(key, "prompts"))


def _statistic(readings: dict, contrast: Contrast, cosines: tuple[float, float]) -> dict:
    """How many prompts each side of ``contrast`` used and the split-half cosine it reached (``cosine``: the
    smaller, the statistic's own)."""
    labels = ("harmful", "harmless") if contrast.name == "dirty" else ("prompts", "contrast")
    sides = {label: {**readings[key].counts(), "cosine": round(cos, 5)}
             for label, key, cos in zip(labels, (contrast.first, contrast.second), cosines)}
    return {**sides, "cosine": round(min(cosines), 5)}

"""`apply_surgical_ablation`: the only place that knows the order of the steps.

inputs → activations → directions (dirty, atoms, fluency Shield, clean) → base validation numbers →
constrained search (layer, Shield rank, strength profile) → bake → hard-negative mining → `SRAReport`.
Every input is checked before the first forward pass; if anything fails after the first bake, all bakes
are undone before the error propagates (`BakeStack`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from .architectures import decoder_layers, residual_writers
from .atoms import AtomRegistry, ConceptAtom, atom_basis, cosine_matrix, principal_basis, subspace_cosine
from .config import AUTO, SRAConfig
from .directions import Directions, select_by_behaviour
from .editing import BakeStack
from .errors import ConfigError
from .extraction import record_residuals, record_token_residuals
from .judge import refusal_probability, refusal_token_ids, resolve_judge
from .mining import mine
from .progress import stage, with_progress_option
from .prompts import load_corpus, load_prompts
from .report import SRAReport, peak_memory
from .search import Validation, constrained_search, default_candidates, default_profiles


class _Timer(dict):
    @contextmanager
    def __call__(self, step: str):
        start = time.perf_counter()
        try:
            with stage(step):
                yield
        finally:
            self[step] = self.get(step, 0.0) + round(time.perf_counter() - start, 3)


@dataclass
class _Inputs:
    """Everything a run reads, loaded and checked once."""

    texts: dict  # set key -> prompts
    sources: dict  # role ("harmful", "harmless", "harmful_val", "harmless_val", "neutral") -> set key
    atoms: list[ConceptAtom]
    layers: list[int]  # candidate direction layers
    fluency_text: list[str]  # passages for the fluency Shield
    budget_text: list[str]  # held-back passages for the perplexity budget

    def prompts(self, role: str) -> list[str]:
        return self.texts[self.sources[role]]

    def to_extract(self) -> set:
        # the validation sets are only scored, never extracted (unless they double as another set)
        keys = {self.sources[r] for r in ("harmful", "harmless", "neutral")}
        return keys | {_set_key(s) for a in self.atoms for s in (a.prompts, a.contrast) if s is not None}


def _set_key(source) -> object:
    return source if isinstance(source, str) else tuple(source)


def _resolve_inputs(model: nn.Module, config: SRAConfig, registry: AtomRegistry) -> _Inputs:
    atoms = registry.select(config.atoms, config.custom_atoms)
    if not any(a.role in ("shield", "confound") for a in atoms):
        raise ConfigError("no shield or confound atoms selected; SRA needs at least one (use standard ablation otherwise)")
    sources = {"harmful": config.harmful_prompts, "harmless": config.harmless_prompts,
               "harmful_val": config.harmful_val_prompts, "harmless_val": config.harmless_val_prompts,
               "neutral": config.neutral_prompts}
    all_sources = list(sources.values()) + [s for a in atoms for s in (a.prompts, a.contrast) if s is not None]
    texts = {_set_key(s): load_prompts(s) for s in all_sources}
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
    return _Inputs(texts, {k: _set_key(v) for k, v in sources.items()}, atoms, layers, corpus[0::2], corpus[1::2])


def _directions(model, tokenizer, inputs: _Inputs, config: SRAConfig, extract: dict,
                ranks: list[int]) -> tuple[Directions, dict]:
    harmful, harmless = inputs.sources["harmful"], inputs.sources["harmless"]
    screened = {harmful, harmless} if config.filter_prompts else set()
    acts, refused = {}, {}
    for key in inputs.to_extract():
        if key in screened:  # the same pass reads what the base model would answer
            acts[key], logprobs = record_residuals(model, tokenizer, inputs.texts[key], next_token=True, **extract)
            refused[key] = refusal_probability(logprobs, refusal_token_ids(tokenizer)) > 0.5
        else:
            acts[key] = record_residuals(model, tokenizer, inputs.texts[key], **extract)
    kept = {"harmful": len(acts[harmful]), "harmless": len(acts[harmless])}
    if screened:
        by_behaviour = select_by_behaviour(acts[harmful], refused[harmful], acts[harmless], ~refused[harmless])
        (harmful_acts, harmless_acts), kept = by_behaviour
    else:
        harmful_acts, harmless_acts = acts[harmful], acts[harmless]
    neutral = acts[inputs.sources["neutral"]]
    bases = {a.name: atom_basis(acts[_set_key(a.prompts)], neutral if a.contrast is None else acts[_set_key(a.contrast)],
                                a.rank or config.atom_rank, a.paired)
             for a in inputs.atoms}
    fluency = None
    if max(ranks) > 0:
        tokens = record_token_residuals(model, tokenizer, inputs.fluency_text, layers=inputs.layers,
                                        batch_size=max(1, config.batch_size // 2))
        fluency = principal_basis(tokens, min(max(ranks), tokens.shape[0] - 1))
    dirs = Directions.build(inputs.layers, harmful_acts, harmless_acts, bases,
                            [a.name for a in inputs.atoms if a.role in ("shield", "confound")], fluency,
                            config.ridge_lambda, projected=config.projected)
    return dirs, kept


@with_progress_option
def apply_surgical_ablation(
    model: nn.Module,
    tokenizer,
    config: Optional[SRAConfig] = None,
    *,
    registry: Optional[AtomRegistry] = None,
    judge: Optional[Callable[[str], bool]] = None,
    progress: Union[bool, Callable[[str, dict], None], None] = None,
) -> SRAReport:
    """Remove refusal from ``model`` in place with Surgical Refusal Ablation and return the report.

    ::

        report = apply_surgical_ablation(model, tokenizer, SRAConfig())
        model.save_pretrained("out/")          # a normal checkpoint: no hooks, no adapters
        report.undo()                          # or put the weights back

    ``judge`` (a ``str -> bool`` callable) overrides ``config.judge``. ``progress=True`` shows a bar per
    long step on stderr (so does the ``transformers_sra`` logger at INFO; otherwise nothing is printed);
    a callable ``progress(step, row)`` is called after every scored search candidate and mining pass.
    """
    config = config or SRAConfig()
    timer = _Timer()
    torch.manual_seed(config.seed)
    model.eval()
    with timer("validate"):
        inputs = _resolve_inputs(model, config, registry or AtomRegistry.default())
        resolve_judge(judge or config.judge)  # a bad judge path fails now
        ranks = list(config.fluency_ranks) if config.fluency_rank == AUTO else [config.fluency_rank]
        profiles = default_profiles() if config.strength == AUTO else [config.profile()]
    batching = dict(batch_size=config.batch_size, system_prompt=config.system_prompt)
    extract = dict(layers=inputs.layers, positions=config.positions, **batching)

    with timer("extract"):
        dirs, kept = _directions(model, tokenizer, inputs, config, extract, ranks)
    with timer("validation"):
        val = Validation.measure_base(model, tokenizer, inputs.prompts("harmful_val"), inputs.prompts("harmless_val"),
                                      inputs.budget_text, **batching)
    directions = {(l, r): dirs.clean(l, r) for l in inputs.layers for r in ranks}
    with timer("search"):
        choice, table = constrained_search(
            model, tokenizer, directions, val, layers=inputs.layers, ranks=ranks, profiles=profiles,
            max_kl=config.max_kl, max_ppl_increase=config.max_ppl_increase, bake_layers=config.layers,
            progress=(lambda row: progress("search", row)) if progress else None)
    chosen = next(row for row in table if row["chosen"])

    with BakeStack(model, norm_preserving=config.norm_preserving) as bakes:
        with timer("bake"):
            first = bakes.bake(directions[(choice.layer, choice.rank)], choice.profile, config.layers)
        with timer("mine"):
            mined = mine(model, tokenizer, bakes, inputs.prompts("harmful"), inputs.prompts("harmless"), val, chosen,
                         layer=choice.layer, atoms=dirs.atom_matrix(choice.layer, choice.rank),
                         iterations=config.iterations, max_kl=config.max_kl,
                         max_ppl_increase=config.max_ppl_increase, ridge_lambda=config.ridge_lambda,
                         bake_layers=config.layers, positions=config.positions, batching=batching)
            if progress:
                for row in mined:
                    progress("mine", row)

    return _report(model, config, inputs, dirs, kept, choice, table, mined, first, bakes, dict(timer), val)


def _report(model, config, inputs, dirs, kept, choice, table, mined, first, bakes, timings, val) -> SRAReport:
    layer = choice.layer
    j = inputs.layers.index(layer)
    clean = bakes.directions[0]
    audit_vectors = torch.stack([dirs.dirty_unit(layer), clean] + [dirs.atom_bases[a.name][j][0] for a in inputs.atoms])
    audit = {"layer": layer, "names": ["dirty", "clean"] + [a.name for a in inputs.atoms],
             "cosine": cosine_matrix(audit_vectors).tolist()}
    coverage = {a.name: {"dirty": subspace_cosine(dirs.dirty_unit(layer), dirs.atom_bases[a.name][j]),
                         "clean": subspace_cosine(clean, dirs.atom_bases[a.name][j])}
                for a in inputs.atoms if a.role == "target"}
    return SRAReport(
        model_name=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        model_type=getattr(model.config, "model_type", ""),
        config=config.to_dict(),
        direction_layer=layer,
        fluency_rank=choice.rank,
        strength=choice.profile.to_dict(),
        bake_layers=first.layers,
        writers_edited=len(first.writer_names),
        directions=[d.tolist() for d in bakes.directions],
        dirty_direction=dirs.dirty_unit(layer).tolist(),
        search=table,
        extraction_prompts=kept,
        validation={"harmful_scored": len(val.harmful), "harmless": len(val.harmless), "text_passages": len(val.text),
                    "base_refusal_score": round(val.base_refusal, 5)},
        atom_audit=audit,
        explained_share={l: dirs.explained(l, choice.rank) for l in inputs.layers},
        target_coverage=coverage,
        iterations=mined,
        timings=timings,
        invariant=bakes.invariant,
        peak_memory=peak_memory(),
        _handles=list(bakes.handles),
    )

"""`apply_surgical_ablation`: the only place that knows the order of the steps.

prompts → extraction → dirty direction + atoms → ridge residualization → layer selection → bake →
hard-negative mining (→ bake …) → `SRAReport`. Every input is checked before the first forward pass;
if anything fails after the first bake, all bakes are undone before the error propagates.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from .architectures import decoder_layers, residual_writers
from .atoms import AtomRegistry, ConceptAtom, atom_basis, cosine_matrix, subspace_cosine
from .config import SRAConfig
from .editing import bake_direction
from .errors import ConfigError
from .extraction import record_residuals
from .judge import first_token_kl, first_token_logprobs, refusal_token_ids, still_refused
from .mining import next_direction
from .prompts import load_prompts
from .report import SRAReport
from .residualize import difference_of_means, explained_share, ridge_residualize
from .selection import default_candidates, select_layer


class _Timer(dict):
    @contextmanager
    def __call__(self, step: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[step] = self.get(step, 0.0) + round(time.perf_counter() - start, 3)


def _atoms_for(config: SRAConfig, registry: AtomRegistry) -> list[ConceptAtom]:
    registry = AtomRegistry(registry[n] for n in registry.names())  # a copy: custom atoms stay local
    for name, spec in config.custom_atoms.items():
        registry.register(
            ConceptAtom(name, spec.get("role", "shield"), spec["prompts"], spec.get("contrast"),
                        bool(spec.get("paired", False)), spec.get("rank")),
            replace=True,
        )
    names = list(config.atoms) + [n for n in config.custom_atoms if n not in config.atoms]
    return [registry[n] for n in names]


def _set_key(source) -> object:
    return source if isinstance(source, str) else tuple(source)


def apply_surgical_ablation(
    model: nn.Module,
    tokenizer,
    config: Optional[SRAConfig] = None,
    *,
    registry: Optional[AtomRegistry] = None,
) -> SRAReport:
    """Remove refusal from ``model`` in place with Surgical Refusal Ablation and return the report.

    ::

        report = apply_surgical_ablation(model, tokenizer, SRAConfig())
        model.save_pretrained("out/")          # a normal checkpoint: no hooks, no adapters
        report.undo()                          # or put the weights back
    """
    config = config or SRAConfig()
    registry = registry or AtomRegistry.default()
    timer = _Timer()
    torch.manual_seed(config.seed)
    model.eval()

    # -- 1. everything that can be wrong with the input, before any compute --------------------------
    with timer("validate"):
        atoms = _atoms_for(config, registry)
        sources = {"harmful": config.harmful_prompts, "harmless": config.harmless_prompts,
                   "harmful_val": config.harmful_val_prompts, "harmless_val": config.harmless_val_prompts,
                   "neutral": config.neutral_prompts}
        atom_sources = [s for a in atoms for s in (a.prompts, a.contrast) if s is not None]
        texts = {_set_key(s): load_prompts(s) for s in list(sources.values()) + atom_sources}
        # the validation sets are only scored, never extracted (unless they double as another set)
        to_extract = {_set_key(s) for s in [sources["harmful"], sources["harmless"], sources["neutral"], *atom_sources]}
        n_layers = len(decoder_layers(model))
        residual_writers(model, config.layers)  # UnsupportedModelError now, not mid-bake
        if config.direction_layer is not None:
            candidates = [config.direction_layer % n_layers]
        else:
            candidates = sorted({i % n_layers for i in (config.candidate_layers or default_candidates(n_layers))})
        for i in [config.direction_layer] + list(config.candidate_layers or []):
            if i is not None and not -n_layers <= i < n_layers:
                raise ConfigError(f"layer {i} is out of range: the model has {n_layers} decoder layers")
        if not any(a.role in ("shield", "confound") for a in atoms):
            raise ConfigError("no shield or confound atoms selected; SRA needs at least one (use standard ablation otherwise)")

    extract = dict(layers=candidates, positions=config.positions, batch_size=config.batch_size,
                   system_prompt=config.system_prompt)

    # -- 2. activations, 3. dirty direction, 4. atoms ----------------------------------------------------
    with timer("extract"):
        acts = {key: record_residuals(model, tokenizer, texts[key], **extract) for key in to_extract}
    dirty = difference_of_means(acts[_set_key(sources["harmful"])], acts[_set_key(sources["harmless"])])
    with timer("atoms"):
        neutral = acts[_set_key(sources["neutral"])]
        bases = {
            a.name: atom_basis(acts[_set_key(a.prompts)],
                               neutral if a.contrast is None else acts[_set_key(a.contrast)],
                               a.rank or config.atom_rank, a.paired)
            for a in atoms
        }
    removable = [a.name for a in atoms if a.role in ("shield", "confound")]
    targets = [a.name for a in atoms if a.role == "target"]

    # -- 5. ridge residualization per candidate layer ------------------------------------------------------
    with timer("residualize"):
        atom_matrix = {c: torch.cat([bases[n][j] for n in removable]) for j, c in enumerate(candidates)}
        clean = {c: ridge_residualize(dirty[j], atom_matrix[c], config.ridge_lambda) for j, c in enumerate(candidates)}
        explained = {c: explained_share(dirty[j], atom_matrix[c], config.ridge_lambda) for j, c in enumerate(candidates)}

    # -- 6. layer selection ------------------------------------------------------------------------------
    harmless_val = texts[_set_key(sources["harmless_val"])]
    batching = dict(batch_size=config.batch_size, system_prompt=config.system_prompt)
    with timer("select"):
        base_harmless_val = first_token_logprobs(model, tokenizer, harmless_val, **batching)
        if len(candidates) == 1:
            layer, sweep = candidates[0], []
        else:
            layer, sweep = select_layer(
                model, tokenizer, clean, texts[_set_key(sources["harmful_val"])], harmless_val,
                refusal_token_ids(tokenizer), base_harmless_val, strength=config.strength,
                kl_weight=config.kl_weight, bake_layers=config.layers, **batching,
            )
    j = candidates.index(layer)
    dirty_unit = dirty[j] / dirty[j].norm()
    audit_vectors = torch.stack([dirty_unit, clean[layer]] + [bases[a.name][j][0] for a in atoms])
    audit = {"layer": layer, "names": ["dirty", "clean"] + [a.name for a in atoms],
             "cosine": cosine_matrix(audit_vectors).tolist()}
    coverage = {t: {"dirty": subspace_cosine(dirty_unit, bases[t][j]), "clean": subspace_cosine(clean[layer], bases[t][j])}
                for t in targets}

    # -- 7. bake, 8. hard-negative mining ----------------------------------------------------------------
    harmful = texts[_set_key(sources["harmful"])]
    harmless = texts[_set_key(sources["harmless"])]
    judge = dict(max_new_tokens=config.max_new_tokens, **batching)
    handles, removed, iterations = [], [], []
    direction, best = clean[layer], len(harmful) + 1
    try:
        for iteration in range(config.iterations + 1):
            start = time.perf_counter()
            with timer("bake"):
                handles.append(bake_direction(model, direction, config.strength, config.layers, orthogonal_to=removed))
            with timer("judge"):
                refused = still_refused(model, tokenizer, harmful, **judge)
                kl = first_token_kl(base_harmless_val, first_token_logprobs(model, tokenizer, harmless_val, **batching))
            # The first bake always stays; a mined one must lower refusals within the KL budget.
            accepted = iteration == 0 or (len(refused) < best and kl <= config.max_kl)
            iterations.append({"iteration": iteration, "refused": len(refused), "total": len(harmful),
                               "val_kl": round(kl, 5), "accepted": accepted,
                               "seconds": round(time.perf_counter() - start, 3)})
            if not accepted:  # a mined direction that does not pay for itself only costs capability
                handles.pop().undo()
                break
            removed.append(direction)
            best = len(refused)
            if not refused or iteration == config.iterations:
                break
            with timer("mine"):
                direction = next_direction(model, tokenizer, refused, harmless, layer, atom_matrix[layer], removed,
                                           ridge_lambda=config.ridge_lambda, positions=config.positions,
                                           batch_size=config.batch_size, system_prompt=config.system_prompt)
    except BaseException:
        for handle in reversed(handles):
            handle.undo()
        raise

    return SRAReport(
        model_name=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        model_type=getattr(model.config, "model_type", ""),
        config=config.to_dict(),
        direction_layer=layer,
        bake_layers=handles[0].layers,
        writers_edited=len(handles[0].writer_names),
        directions=[d.tolist() for d in removed],
        dirty_direction=dirty_unit.tolist(),
        layer_sweep=sweep,
        atom_audit=audit,
        explained_share=explained,
        target_coverage=coverage,
        iterations=iterations,
        timings=dict(timer),
        _handles=handles,
    )

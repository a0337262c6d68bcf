"""The audit before an edit: how the refusal direction sits among the atoms, and what removing it costs per layer.

Runs the first half of `apply_surgical_ablation` (inputs, extraction, directions) and the layer stage of the
search, and changes no weight::

    audit = audit_model(model, tokenizer, SRAConfig())
    audit["cosine"][14]      # cosines between dirty, clean and every atom's first direction at layer 14
    audit["sweep"]           # per layer: refusal score, KL, ΔPPL of removing the clean direction (hooks)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..config import AUTO, SRAConfig
from ..progress import stage, with_progress_option
from ..prompts import chat_template_kwargs
from .atoms import AtomRegistry, cosine_matrix
from .build_directions import build_directions
from .inputs import resolve_inputs
from .search import SearchSpace, Validation, constrained_search, default_profiles


@with_progress_option
@torch.no_grad()
def audit_model(model: nn.Module, tokenizer, config: Optional[SRAConfig] = None, *,
                registry: Optional[AtomRegistry] = None, sweep: bool = True, progress=None) -> dict:
    """Atom orthogonality per candidate layer and, with ``sweep``, the per-layer ablation table; no edit.

    The sweep scores the clean direction of each candidate layer with the first fluency rank and strength
    profile the search would try, on the validation split, exactly like the search's first stage.
    ``progress=True`` shows bars; a callable ``progress("sweep", row)`` gets each scored row.
    """
    config = config or SRAConfig()
    with chat_template_kwargs(config.chat_template_kwargs):
        return _audit(model, tokenizer, config, registry, sweep, progress)


def _audit(model: nn.Module, tokenizer, config: SRAConfig, registry, sweep: bool, progress) -> dict:
    model.eval()
    with stage("validate"):
        inputs = resolve_inputs(model, config, registry or AtomRegistry.default(), tokenizer)
    rank = config.fluency_ranks[0] if config.fluency_rank == AUTO else config.fluency_rank
    profile = default_profiles(config.per_layer_directions)[0] if config.strength == AUTO else config.profile()
    with stage("extract"):
        dirs, kept = build_directions(model, tokenizer, inputs, config,
                                      dict(layers=inputs.layers, positions=config.positions, **config.batching), [rank])
    names = ["dirty", "clean"] + [a.name for a in inputs.atoms]
    cosine, explained = {}, {}
    for layer in inputs.layers:
        j = dirs.layers.index(layer)
        vectors = [dirs.dirty_unit(layer), dirs.clean(layer, rank)] + [dirs.atom_bases[a.name][j][0] for a in inputs.atoms]
        cosine[layer] = [[round(c, 4) for c in row] for row in cosine_matrix(torch.stack(vectors)).tolist()]
        explained[layer] = round(dirs.explained(layer, rank), 4)
    result = {"layers": inputs.layers, "names": names, "roles": {a.name: a.role for a in inputs.atoms},
              "fluency_rank": rank, "profile": profile.to_dict(), "cosine": cosine, "explained_share": explained,
              "extraction_prompts": kept, "extraction_reads": dirs.reads,
              "sweep": [], "best_layer": None, "base_refusal_score": None,
              "budgets": dataclasses.asdict(config.budgets)}
    if not sweep:
        return result
    with stage("base validation numbers"):
        val = Validation.measure_base(model, tokenizer, inputs.prompts("harmful_val"), inputs.prompts("harmless_val"),
                                      inputs.budget_text, **config.batching)
    with stage("layer sweep"):
        space = SearchSpace({(l, rank): dirs.removed(l, rank, config.per_layer_directions) for l in inputs.layers},
                            inputs.layers, [rank], [profile], config.layers)
        choice, table = constrained_search(  # the sweep shows every layer's refusal score, over the KL budget too
            model, tokenizer, space, val, config.budgets, score_all=True,
            progress=(lambda row: progress("sweep", row)) if progress else None)
    for row in table:
        row["explained_share"] = explained[row["layer"]]
    result.update(sweep=table, best_layer=choice.layer, base_refusal_score=round(val.base_refusal, 5))
    return result

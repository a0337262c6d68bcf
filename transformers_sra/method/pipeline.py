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

from ..config import AUTO, SRAConfig
from ..models.architectures import writer_record
from ..progress import stage, with_progress_option
from ..prompts import chat_template_kwargs
from ..report import SRAReport, direction_record, peak_memory
from ..signals.judge import resolve_classifier
from .atoms import AtomRegistry, cosine_matrix, subspace_cosine
from .build_directions import build_directions
from .directions import Directions
from .editing import BakeStack
from .inputs import RunInputs, resolve_inputs
from .mining import MiningSetup, mine
from .search import Candidate, JudgedRanking, SearchSpace, Validation, constrained_search, default_profiles


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
class _Run:
    """What one run measured and chose, for the report."""

    inputs: RunInputs
    dirs: Directions
    kept: dict  # extraction prompts kept by the behaviour filter
    val: Validation
    choice: Candidate
    table: list[dict]  # every scored search candidate
    mined: list[dict]  # every mining pass tried


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

    ``judge`` (a ``str -> bool`` callable, True = refused) overrides ``config.judge`` wherever replies are judged
    (hard-negative mining and its acceptance); it is checked before the first forward pass. ``progress=True`` shows
    a bar per long step on stderr (so does the ``transformers_sra`` logger at INFO; otherwise nothing is printed);
    a callable ``progress(step, row)`` is called after every scored search candidate and mining pass.
    """
    config = config or SRAConfig()
    # config.seed seeds this run's own random state; the caller's generators come back as they were
    devices = range(torch.cuda.device_count())
    with torch.random.fork_rng(devices=devices), chat_template_kwargs(config.chat_template_kwargs):
        torch.manual_seed(config.seed)
        return _ablate(model, tokenizer, config, registry, judge, progress)


def _ablate(model, tokenizer, config: SRAConfig, registry, judge, progress) -> SRAReport:
    timer = _Timer()
    model.eval()
    with timer("validate"):
        inputs = resolve_inputs(model, config, registry or AtomRegistry.default(), tokenizer)
        classify_reply = resolve_classifier(judge or config.judge)  # a bad judge path fails now, not after the search
        ranks = list(config.fluency_ranks) if config.fluency_rank == AUTO else [config.fluency_rank]
        profiles = default_profiles(config.per_layer_directions) if config.strength == AUTO else [config.profile()]
    extract = dict(layers=inputs.layers, positions=config.positions, **config.batching)

    with timer("extract"):
        dirs, kept = build_directions(model, tokenizer, inputs, config, extract, ranks)
    with timer("validation"):
        val = Validation.measure_base(model, tokenizer, inputs.prompts("harmful_val"), inputs.prompts("harmless_val"),
                                      inputs.budget_text, screen_prompts=config.screen_prompts, **config.batching)
    space = SearchSpace({(l, r): dirs.removed(l, r, config.per_layer_directions) for l in inputs.layers for r in ranks},
                        inputs.layers, ranks, profiles, config.layers)
    judging = JudgedRanking(classify_reply, config.judged_contenders, config.judged_tokens)
    with timer("search"):
        choice, table = constrained_search(
            model, tokenizer, space, val, config.budgets, judging=judging if config.judged_contenders > 1 else None,
            progress=(lambda row: progress("search", row)) if progress else None)

    with BakeStack(model, norm_preserving=config.norm_preserving) as bakes:
        with timer("bake"):
            bakes.bake(space.directions[(choice.layer, choice.rank)], choice.profile, config.layers)
        with timer("mine"):
            setup = MiningSetup.from_config(config, inputs, val, layer=choice.layer,
                                            atoms=dirs.atom_matrix(choice.layer, choice.rank), classify=classify_reply)
            mined = mine(model, tokenizer, bakes, setup, config.iterations)
            if progress:
                for row in mined:
                    progress("mine", row)

    return _report(model, config, _Run(inputs, dirs, kept, val, choice, table, mined), bakes, dict(timer))


def _report(model: nn.Module, config: SRAConfig, run: _Run, bakes: BakeStack, timings: dict) -> SRAReport:
    inputs, dirs, choice, val = run.inputs, run.dirs, run.choice, run.val
    first = bakes.handles[0]
    layer = choice.layer
    j = dirs.layers.index(layer)
    clean = dirs.clean(layer, choice.rank)
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
        directions=[direction_record(d) for d in bakes.directions],
        dirty_direction=dirs.dirty_unit(layer).tolist(),
        standard_direction=dirs.unit(dirs.unfiltered, layer).tolist(),
        search=run.table,
        extraction_prompts=run.kept,
        extraction_reads=dirs.reads,
        validation={"harmful_scored": len(val.harmful), "harmless": len(val.harmless), "text_passages": len(val.text),
                    "base_refusal_score": round(val.base_refusal, 5)},
        atom_audit=audit,
        explained_share={l: dirs.explained(l, choice.rank) for l in inputs.layers},
        target_coverage=coverage,
        iterations=run.mined,
        timings=timings,
        invariant=bakes.invariant,
        peak_memory=peak_memory(),
        writers=writer_record(model, config.layers),
        _handles=list(bakes.handles),
    )

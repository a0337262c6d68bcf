"""The run's directions measured on the model: extraction, the behaviour filter, atom bases, the fluency Shield.

The one step between `inputs.resolve_inputs` and the tensor-only `directions.Directions`; the pipeline and
the audit both call it::

    dirs, kept = build_directions(model, tokenizer, inputs, config, extract, ranks=[0, 64])
"""

from __future__ import annotations

from ..config import SRAConfig
from ..signals.logprobs import refusal_probability, refusal_token_ids
from .atoms import atom_basis, principal_basis
from .directions import Directions, select_by_behaviour
from .extraction import record_residuals, record_token_residuals
from .inputs import RunInputs, set_key
from .residualize import difference_of_means


def build_directions(model, tokenizer, inputs: RunInputs, config: SRAConfig, extract: dict,
                     ranks: list[int]) -> tuple[Directions, dict]:
    """Extract every set ``inputs`` needs (``extract``: layers, positions, batching) and build the `Directions`;
    returns them and how many harmful/harmless prompts the behaviour filter kept."""
    harmful, harmless = inputs.sources["harmful"], inputs.sources["harmless"]
    screened = {harmful, harmless} if config.filter_prompts else set()
    acts, refused, every = {}, {}, {}  # every: the training sets at the candidates and the later layers
    n = len(inputs.layers)
    refusal_ids = refusal_token_ids(tokenizer)
    for key in sorted(inputs.to_extract(), key=repr):  # one order on every rank: a set's follows the hash seed
        # the training sets also give the later layers' own directions (per-layer directions)
        layers = inputs.layers + (inputs.later_layers if key in (harmful, harmless) else [])
        if key in screened:  # the same pass reads what the base model would answer
            recorded, refusal = record_residuals(model, tokenizer, inputs.texts[key], next_token=True,
                                                 keep=lambda logp: refusal_probability(logp, refusal_ids),
                                                 **{**extract, "layers": layers})
            refused[key] = refusal > 0.5
        else:
            recorded = record_residuals(model, tokenizer, inputs.texts[key], **{**extract, "layers": layers})
        acts[key], every[key] = recorded[:, :n], recorded
    kept = {"harmful": len(acts[harmful]), "harmless": len(acts[harmless])}
    if screened:
        (harmful_every, harmless_every), kept = select_by_behaviour(every[harmful], refused[harmful], every[harmless],
                                                                    ~refused[harmless])
    else:
        harmful_every, harmless_every = every[harmful], every[harmless]
    harmful_acts, harmless_acts = harmful_every[:, :n], harmless_every[:, :n]
    neutral = acts[inputs.sources["neutral"]]
    bases = {a.name: atom_basis(acts[set_key(a.prompts)], neutral if a.contrast is None else acts[set_key(a.contrast)],
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
    dirs.unfiltered = difference_of_means(acts[harmful], acts[harmless])  # the field's standard ablation direction
    if inputs.later_layers:
        dirs.later = dict(zip(inputs.later_layers, difference_of_means(harmful_every[:, n:], harmless_every[:, n:])))
    return dirs, kept

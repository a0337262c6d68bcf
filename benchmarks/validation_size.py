"""How many validation prompts the search's layer step needs: its choice on random subsets against the full sets.

Every search candidate reads ``harmful_val`` (its refusal score) and ``harmless_val`` (its KL), 130 prompts each,
so their size sets most of the search's cost. This scores the layer step (every default candidate layer at the
first fluency rank and profile, hooks as in the search) once, keeping each prompt's refusal probability and KL, then
redraws subsets of ``--sizes`` prompts of each set and makes the layer step's choice on them: the lowest mean refusal
score among the layers within the KL budget (perplexity is measured on separate text, so it is left out). Subsets
are bootstrap draws (with replacement), so a draw of all 130 shows the noise of the current size itself. The
agreement with the choice on all prompts, per size, is what a smaller default would risk. Validation data only::

    python benchmarks/validation_size.py                       # demo model, --dtype auto, 1000 draws per size
    python benchmarks/validation_size.py --model tiny --draws 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import load, tiny_config

from transformers_sra import SRAConfig
from transformers_sra.cli.loading import compute_dtype
from transformers_sra.measure.records import git_commit
from transformers_sra.method.atoms import AtomRegistry
from transformers_sra.method.build_directions import build_directions
from transformers_sra.method.editing import ablate_activations
from transformers_sra.method.inputs import resolve_inputs
from transformers_sra.method.search import default_profiles
from transformers_sra.signals.logprobs import first_token_kls, first_token_logprobs, refusal_probability, refusal_token_ids


def per_prompt(model, tok, inputs, config, direction, profile, base_harmless, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Each harmful_val prompt's refusal probability and each harmless_val prompt's KL(base ‖ edited)."""
    batching = config.batching
    with ablate_activations(model, direction, profile, config.layers):
        refusal = refusal_probability(first_token_logprobs(model, tok, inputs.prompts("harmful_val"), **batching), ids)
        harmless = first_token_logprobs(model, tok, inputs.prompts("harmless_val"), **batching)
    return refusal, first_token_kls(base_harmless, harmless)


def layer_choice(refusal: dict, kl: dict, max_kl: float, harmful: torch.Tensor, harmless: torch.Tensor):
    """The layer step's choice on the prompts indexed by ``harmful`` and ``harmless`` (None: no layer within KL)."""
    feasible = [l for l in refusal if float(kl[l][harmless].mean()) <= max_kl]
    return min(feasible, key=lambda l: float(refusal[l][harmful].mean()), default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' or 'tiny' (a random test model, for a smoke run)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 130])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/validation_size.json")
    args = parser.parse_args()
    commit, start = git_commit(), time.perf_counter()
    model, tok = load(args.model)
    if args.model != "tiny" and args.dtype == "auto":
        model.to(compute_dtype(torch.bfloat16))  # the demo checkpoint's dtype, as `sra ablate --dtype auto` computes it
    config = tiny_config(0) if args.model == "tiny" else SRAConfig()
    inputs = resolve_inputs(model, config, AtomRegistry.default(), tok)
    rank, profile = config.fluency_ranks[0], default_profiles()[0]
    extract = dict(layers=inputs.layers, positions=config.positions, batch_size=config.batch_size,
                   system_prompt=config.system_prompt)
    dirs, _ = build_directions(model, tok, inputs, config, extract, [rank])
    ids = refusal_token_ids(tok)
    base_harmless = first_token_logprobs(model, tok, inputs.prompts("harmless_val"), batch_size=config.batch_size,
                                         system_prompt=config.system_prompt)
    refusal, kl = {}, {}
    for layer in inputs.layers:
        refusal[layer], kl[layer] = per_prompt(model, tok, inputs, config, dirs.clean(layer, rank), profile,
                                               base_harmless, ids)
    n_harmful, n_harmless = len(refusal[inputs.layers[0]]), len(kl[inputs.layers[0]])
    full = layer_choice(refusal, kl, config.max_kl, torch.arange(n_harmful), torch.arange(n_harmless))
    generator = torch.Generator().manual_seed(0)
    agreement = {}
    for size in args.sizes:
        choices = [layer_choice(refusal, kl, config.max_kl, torch.randint(n_harmful, (size,), generator=generator),
                                torch.randint(n_harmless, (size,), generator=generator)) for _ in range(args.draws)]
        agreement[str(size)] = {"same_choice": sum(c == full for c in choices) / args.draws,
                                "choices": {str(c): choices.count(c) for c in sorted(set(choices), key=str)}}
    record = {"commit": commit, "command": "python benchmarks/validation_size.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if k != "out"),
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "max_kl": config.max_kl,
              "prompts": {"harmful_val": n_harmful, "harmless_val": n_harmless}, "draws": args.draws,
              "layers": {str(l): {"refusal_score": round(float(refusal[l].mean()), 5), "kl": round(float(kl[l].mean()), 5)}
                         for l in inputs.layers},
              "choice_on_all": full, "subsets": agreement, "seconds": round(time.perf_counter() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: record[k] for k in ("layers", "choice_on_all", "subsets")}, indent=1))


if __name__ == "__main__":
    main()

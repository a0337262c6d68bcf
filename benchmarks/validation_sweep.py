"""Choosing on validation: the judged refusal of many candidate edits, to see what the search's knobs can buy.

The pipeline's search scores candidates by a first-token refusal score. This benchmark asks the question that
score stands in for: on the *validation* split, which edit leaves the fewest judged refusals in 128-token replies
within the budgets? Candidates are the search's own space made wider: every default candidate layer, the
difference of means with and without projection onto the harmless mean (``projected``), the default tent profile
scaled from 0.8× to 1.6×, and three attention/MLP splits. Each is applied with hooks (`ablate_activations`,
numerically the bake). A cheap pass (`Validation.measure`: refusal score, first-token KL) screens them; those within
``--screen-kl`` get the full evaluation through the one evaluation path (`evaluate_model` on ``harmful_val``,
``harmless_val`` and the budget passages of ``general_val``). With ``--rank2 γ…``, the default edit (the search's
first profile at ``--layers[0]``) is baked, the harmful training prompts it still refuses in judged 32-token replies
give a second direction (`mining.next_direction`: against the answered ones and against the harmless set, cleaned
and orthogonal to the first), and each is evaluated on top at the tent scaled by each γ. Test splits are never read::

    python benchmarks/validation_sweep.py --device cuda --batch-size 256      # minutes on a GPU, hours on 2 cores
    python benchmarks/validation_sweep.py --layers 14 --scales 1.0 1.1 1.25 --splits 1,1 --no-projected --rank2 0.5 1
    python benchmarks/validation_sweep.py --model tiny --limit 4              # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch
from _common import load, machine_info, plot, tiny_config

from transformers_sra import SRAConfig
from transformers_sra.measure.evaluation import EvalSets, evaluate_model
from transformers_sra.measure.records import git_commit, results_record, write_results
from transformers_sra.method.atoms import AtomRegistry
from transformers_sra.method.build_directions import build_directions
from transformers_sra.method.editing import BakeStack, ablate_activations
from transformers_sra.method.inputs import resolve_inputs
from transformers_sra.method.mining import MiningSetup, judge_replies, next_direction
from transformers_sra.method.search import Validation, default_profiles
from transformers_sra.signals.judge import Outcome
from transformers_sra.strength import StrengthProfile

SCALES = (0.8, 1.0, 1.2, 1.4, 1.6)
COLUMNS = [["name", "candidate"], ["refusal_rate", "refused harmful_val (95% CI)"],
           ["degenerate_rate", "degenerate (95% CI)"], ["first_token_kl", "first-token KL harmless_val", "{:.3f}"],
           ["multi_token_kl", "KL along 32-token replies", "{:.4f}"],
           ["perplexity_change", "ΔPPL budget passages", "{:+.2%}"], ["refusal_score", "refusal score", "{:.3f}"]]
SPLITS = ((1.0, 1.0), (1.0, 0.5), (0.5, 1.0))  # (attention-out, MLP-down) factors


def profile(scale: float, attn: float, mlp: float) -> StrengthProfile:
    tent = default_profiles()[0]
    return dataclasses.replace(tent, peak=min(tent.peak * scale, 2.0), floor=tent.floor * scale, attn=attn, mlp=mlp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--model", default="demo", help="'demo' or 'tiny' (a random test model, for a smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each validation set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--screen-kl", type=float, default=0.065, help="full evaluation only below this first-token KL")
    parser.add_argument("--max-seconds", type=float, default=float("inf"), help="stop judging after this long")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="direction layers (default: the search's)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    parser.add_argument("--splits", nargs="+", default=[f"{a},{m}" for a, m in SPLITS], help="attn,mlp factor pairs")
    parser.add_argument("--no-projected", action="store_true", help="only the unprojected difference of means")
    parser.add_argument("--rank2", type=float, nargs="*", default=[], help="strengths of a mined second direction")
    args = parser.parse_args()
    splits = [tuple(float(x) for x in s.split(",")) for s in args.splits]
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else " " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)))
             for k, v in vars(args).items() if v not in (None, False, []) and k != "out" and v != float("inf")]
    command = "python benchmarks/validation_sweep.py " + " ".join(flags)
    start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, tok = load(args.model)
    model.to(args.device)
    machine, commit = machine_info(args.device), git_commit()  # the tree this run started from
    config = SRAConfig()
    if args.model == "tiny":
        config = dataclasses.replace(tiny_config(0), fluency_rank=2)
    rank = config.fluency_ranks[0] if config.fluency_rank == "auto" else config.fluency_rank
    if args.layers:
        config = dataclasses.replace(config, candidate_layers=args.layers)
    inputs = resolve_inputs(model, config, AtomRegistry.default(), tok)
    cut = (lambda xs: xs[: args.limit]) if args.limit else (lambda xs: xs)
    sets = EvalSets(harmful=cut(inputs.prompts("harmful_val")), harmless=cut(inputs.prompts("harmless_val")),
                    over_refusal=[], text=cut(inputs.budget_text), math=[], code=[])
    batching = dict(batch_size=args.batch_size, system_prompt=config.system_prompt)
    extract = dict(layers=inputs.layers, positions=config.positions, **batching)
    directions, atoms = {}, {}
    for projected in (False,) if args.no_projected else (False, True):
        dirs, _ = build_directions(model, tok, inputs, dataclasses.replace(config, projected=projected), extract, [rank])
        directions.update({(layer, projected): dirs.clean(layer, rank) for layer in inputs.layers})
        atoms.update({(layer, projected): dirs.atom_matrix(layer, rank) for layer in inputs.layers})
    val = Validation.measure_base(model, tok, sets.harmful, sets.harmless, sets.text, **batching)
    measure = dict(batch_size=args.batch_size, judged_harmless=0)
    evaluations = {"base": evaluate_model(model, tok, sets, **measure)}
    rows = [{"name": "base", "method": "base", "seconds": round(time.perf_counter() - start, 1)}]
    screened = []
    for (layer, projected), scale, (attn, mlp) in itertools.product(directions, args.scales, splits):
        p = profile(scale, attn, mlp)
        with ablate_activations(model, directions[(layer, projected)], p):
            row = val.measure(model, tok, text_if=lambda r: False)
        screened.append({"layer": layer, "projected": projected, "scale": scale, "attn": attn, "mlp": mlp, **row})
    screened.sort(key=lambda r: r["refusal_score"])
    (Path(args.out)).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "validation_screen.json").write_text(json.dumps(screened, indent=1))
    print(f"screened {len(screened)} candidates in {time.perf_counter() - start:.0f} s", flush=True)

    def evaluate(name: str, row: dict) -> None:
        t0 = time.perf_counter()
        evaluations[name] = evaluate_model(model, tok, sets, base=evaluations["base"], **measure)
        rows.append({"name": name, **row, "seconds": round(time.perf_counter() - t0, 1)})
        m = evaluations[name].metrics
        print(f"{name:34s} refused {m['refusal_rate']:.1%} degenerate {m['degenerate_rate']:.1%}  "
              f"KL {m['first_token_kl']:.4f}  KL32 {m['multi_token_kl']:.4f}  ΔPPL {m['perplexity_change']:+.2%}",
              flush=True)
        record = results_record(evaluations, sets, command=command,
                                extra={"machine": machine, "split": "validation", "columns": COLUMNS}, commit=commit)
        for r, extra in zip(record["rows"], rows):
            r.update(extra)
        write_results(Path(args.out) / "validation_sweep.json", record)
        plot(record["rows"], Path(args.out) / "validation_sweep.png", "Refusal vs KL, validation split",
             ("harmful_val", "harmless_val"))

    for cand in (r for r in screened if r["kl"] <= args.screen_kl):
        if time.perf_counter() - start > args.max_seconds:
            break
        with ablate_activations(model, directions[(cand["layer"], cand["projected"])],
                                profile(cand["scale"], cand["attn"], cand["mlp"])):
            evaluate(f"L{cand['layer']}{' proj' if cand['projected'] else ''} x{cand['scale']} "
                     f"attn{cand['attn']} mlp{cand['mlp']}", {"method": "rank1_tent", **cand})
    if not args.rank2:
        return
    layer = inputs.layers[0]
    first, tent = directions[(layer, False)], default_profiles()[0]
    setup = MiningSetup.from_config(dataclasses.replace(config, batch_size=args.batch_size), inputs, val, layer=layer,
                                    atoms=atoms[(layer, False)])
    with BakeStack(model) as bakes:
        bakes.bake(first, tent)
        outcomes = judge_replies(model, tok, setup.harmful, setup)
        refused = [p for p, o in zip(setup.harmful, outcomes) if o is Outcome.REFUSED]
        answered = [p for p, o in zip(setup.harmful, outcomes) if o is Outcome.ANSWERED]
        print(f"mining: {len(refused)} of {len(outcomes)} training prompts still refused", flush=True)
        if len(refused) < setup.min_refused or len(answered) < setup.min_refused:
            print("too few refused or answered training prompts for a second direction", flush=True)
            return
        for contrast, others in (("answered", answered), ("harmless", setup.harmless)):
            second = next_direction(model, tok, refused, others, setup, [first])
            for gamma in args.rank2:
                with ablate_activations(model, second, profile(gamma, tent.attn, tent.mlp)):
                    evaluate(f"L{layer} x1.0 + mined vs {contrast} x{gamma}",
                             {"method": f"rank2_{contrast}", "layer": layer, "rank": 2, "scale2": gamma,
                              "still_refused_train": len(refused)})
        bakes.undo_all()


if __name__ == "__main__":
    main()

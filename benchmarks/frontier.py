"""The refusal/KL frontier on the demo model's *test* split, every point through the one evaluation path.

Every point is `evaluation.evaluate_model` of the model as baked, against the base model's own numbers: the three
outcomes of 128-token greedy replies to ``harmful_test`` (95% Clopper-Pearson intervals), first-token KL and the
multi-token KL along the base model's 32-token replies on ``harmless_test``, ΔPPL on ``general_test``; base and
the SRA default also get ``over_refusal_test`` and the outcomes of replies to harmless prompts. The curves, all
flat γ at SRA's direction layer and named as in `transformers_sra.method.baselines`:

* ``standard``: the field's abliteration (difference of means of *all* training prompts);
* ``standard_filtered``: SRA's dirty direction (training prompts filtered by the base model's behaviour);
* ``rank1_flat``: SRA's first clean direction;
* ``rank-k``: SRA with ``--mining K`` judged mining passes, each prefix of its directions baked as the pipeline
  baked them (k = 1 is SRA without mining);

and the default `SRAConfig()`. Writes ``frontier_points.json`` (the shared results shape) and ``frontier.png``::

    pip install -e ".[demo,bench]"
    python benchmarks/frontier.py --limit 100 --strengths 0.5 1.0 --mining 2   # hours on 2 CPU cores
    python benchmarks/frontier.py --model tiny --limit 4                          # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from _common import load, machine_info, plot, tiny_config  # benchmarks/ is the script's folder

from transformers_sra import SRAConfig, apply_surgical_ablation, bake_direction
from transformers_sra.measure.evaluation import EvalSets, evaluate_model
from transformers_sra.measure.records import git_commit, results_record, write_results
from transformers_sra.method.editing import reapply_edit

COLUMNS = [["name", "point"], ["refusal_rate", "refused (95% CI)"], ["degenerate_rate", "degenerate (95% CI)"],
           ["first_token_kl", "first-token KL", "{:.3f}"], ["multi_token_kl", "KL along 32-token replies", "{:.4f}"],
           ["perplexity_change", "ΔPPL general_test", "{:+.2%}"], ["over_refusal_rate", "over-refusal (95% CI)"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--model", default="demo", help="'demo' or 'tiny' (a random test model, for a smoke run)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each test set")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.75, 1.0])
    parser.add_argument("--mining", type=int, default=2, help="judged mining passes for the rank-k curve")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="where the model runs (fp32 everywhere; TF32 off on CUDA)")
    args = parser.parse_args()
    out = Path(args.out)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    model, tok = load(args.model)
    model.to(args.device)
    machine, commit = machine_info(args.device), git_commit()  # the tree this run started from
    full = EvalSets.default(limit=args.limit)
    curve_sets = dataclasses.replace(full, over_refusal=[], math=[], code=[])
    measure = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    rows, evaluations = [], {}

    def record(name: str, method: str, strength, sets: EvalSets, **extra) -> None:
        start = time.perf_counter()
        judged_harmless = 64 if sets is full else 0
        evaluations[name] = evaluate_model(model, tok, sets, base=evaluations.get("base"),
                                           judged_harmless=judged_harmless, **measure)
        rows.append({"name": name, "method": method, "strength": strength,
                     "seconds": round(time.perf_counter() - start, 1), **extra})
        m = evaluations[name].metrics
        print(f"{name:28s} refused {m['refusal_rate']:.1%} degenerate {m['degenerate_rate']:.1%}  "
              f"KL {m.get('first_token_kl', 0):.4f}  KL32 {m.get('multi_token_kl', 0):.4f}  "
              f"ΔPPL {m.get('perplexity_change', 0):+.2%}", flush=True)
        record_ = results_record(evaluations, full, command="python benchmarks/frontier.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None and k != "out"), extra={"machine": machine}, commit=commit)
        for row, extra_ in zip(record_["rows"], rows):
            row.update(extra_)
        write_results(out / "frontier_points.json", {**record_, "columns": COLUMNS})

    record("base", "base", 0.0, full)
    config = SRAConfig() if args.model != "tiny" else tiny_config(0)
    start = time.perf_counter()
    default = apply_surgical_ablation(model, tok, config)
    record("SRA default", "sra_default", default.strength["peak"], full,
           pipeline_seconds=round(time.perf_counter() - start, 1), mining=default.iterations)
    default.undo()

    mined = apply_surgical_ablation(model, tok, dataclasses.replace(config, iterations=args.mining)) \
        if args.mining else default
    bakes = mined.bakes()
    if mined is not default:
        mined.undo()
    for k in range(1, len(bakes) + 1):  # each prefix of the directions, baked as the pipeline baked them
        prefix = dataclasses.replace(mined, directions=mined.directions[:k],
                                     iterations=[r for r in mined.iterations if r.get("accepted")][: k - 1])
        reapply_edit(model, prefix)
        try:
            record(f"rank-{k}", "rank_k", k, curve_sets)
        finally:
            prefix.undo()

    curves = (("standard", torch.tensor(default.standard_direction)),
              ("standard_filtered", torch.tensor(default.dirty_direction)),
              ("rank1_flat", default.direction_tensor(0)))
    for method, direction in curves:
        for gamma in args.strengths:
            handle = bake_direction(model, direction, gamma, default.config.get("layers"))
            try:
                record(f"{method} γ={gamma}", method, gamma, curve_sets, layer=default.direction_layer)
            finally:
                handle.undo()
    plot(json.loads((out / "frontier_points.json").read_text())["rows"], out / "frontier.png")
    print("wrote", out / "frontier_points.json", "and", out / "frontier.png")


if __name__ == "__main__":
    main()

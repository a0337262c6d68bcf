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
import os
import time
from pathlib import Path

import torch

from transformers_sra import SRAConfig, apply_surgical_ablation, bake_direction, load_demo_model
from transformers_sra.measure.evaluation import EvalSets, evaluate_model
from transformers_sra.measure.records import git_commit, results_record, write_results
from transformers_sra.method.editing import reapply_edit

COLUMNS = [["name", "point"], ["refusal_rate", "refused (95% CI)"], ["degenerate_rate", "degenerate (95% CI)"],
           ["first_token_kl", "first-token KL", "{:.3f}"], ["multi_token_kl", "KL along 32-token replies", "{:.4f}"],
           ["perplexity_change", "ΔPPL general_test", "{:+.2%}"], ["over_refusal_rate", "over-refusal (95% CI)"]]


def load(name: str):
    if name != "tiny":
        return load_demo_model(dtype=torch.float32)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_tiny_model, make_tokenizer

    return make_tiny_model("qwen2"), make_tokenizer()


def machine_info(device: str) -> dict:
    """Where a benchmark ran, for its results record (the model is fp32 everywhere)."""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "dtype": "float32"}


def tiny_config(iterations: int) -> SRAConfig:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_pipeline_cli import SMALL

    return SRAConfig(**{**SMALL, "iterations": iterations})


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


STYLES = {"base": ("black", "s", "base"),
          "standard": ("tab:red", "o", "standard ablation (all training prompts)"),
          "standard_filtered": ("tab:orange", "o", "standard ablation, filtered direction"),
          "rank1_flat": ("tab:blue", "o", "SRA rank 1, flat γ"),
          "rank1_tent": ("tab:blue", "o", "SRA rank 1, the default tent scaled"),
          "rank_k": ("tab:purple", "D", "SRA rank k (judged mining)"),
          "rank2_answered": ("tab:purple", "D", "SRA rank 2: + mined direction vs answered prompts"),
          "rank2_harmless": ("tab:pink", "D", "SRA rank 2: + mined direction vs harmless prompts"),
          "sra_default": ("tab:green", "*", "SRA default (searched)"),
          "read_side": ("tab:cyan", "^", "SRA rank 1 + read side (q/k/v, gate/up) after its layer"),
          "read_side_only": ("tab:olive", "^", "read side only"),
          "discriminative": ("tab:brown", "v", "SRA rank 1 on the separating layers only"),
          "cone": ("tab:gray", "P", "SRA rank 1 + a second direction (cone)"),
          "per_layer": ("tab:purple", "X", "each late layer's own direction, the tent scaled")}
# methods whose points are one knob turned (drawn as a line); the others are separate edits (markers only)
CURVES = {"standard", "standard_filtered", "rank1_flat", "rank1_tent", "rank_k", "per_layer"}


def plot(rows, path, title: str = "Refusal vs KL, test split", sets: tuple = ("harmful_test", "harmless_test")) -> None:
    """Refused share (95% CI) against first-token KL, one line per ``row["method"]`` (see `STYLES`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, (color, marker, label) in STYLES.items():
        pts = sorted((r for r in rows if r.get("method") == method), key=lambda r: r.get("first_token_kl", 0.0))
        if not pts:
            continue
        x = [r.get("first_token_kl", 0.0) for r in pts]
        y = [100 * r["refusal_rate"]["rate"] for r in pts]
        err = [[100 * (r["refusal_rate"]["rate"] - r["refusal_rate"]["ci95"][0]) for r in pts],
               [100 * (r["refusal_rate"]["ci95"][1] - r["refusal_rate"]["rate"]) for r in pts]]
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, markersize=10 if marker == "*" else 6, capsize=3,
                    linestyle="-" if len(pts) > 1 and method in CURVES else "none", label=label)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel(f"first-token KL on {sets[1]} (lower is better)")
    ax.set_ylabel(f"refused on {sets[0]}, % (95% CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

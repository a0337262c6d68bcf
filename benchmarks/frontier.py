"""The refusal/KL frontier on the demo model's *test* split: base, standard ablation, SRA.

Standard ablation is the difference-of-means direction of SRA's chosen layer over *all* training
prompts, baked flat at several strengths (what abliteration tools do); "standard, filtered" is the same
for SRA's own dirty direction (training prompts filtered by the base model's behaviour, no atoms, no
profile). SRA is `SRAConfig()` as shipped, plus its clean direction at the same flat strengths, so the
curves are traced the same way. Every point: judged refusal on ``harmful_test`` (128-token greedy replies,
95% Clopper-Pearson interval), first-token KL on ``harmless_test``, perplexity change on ``general_test``;
base and the SRA default also get the over-refusal rate on ``over_refusal_test``. Writes JSON and a PNG::

    pip install -e ".[demo,bench]"
    python benchmarks/frontier.py --out benchmarks/results          # about 100 minutes on 2 CPU cores
    python benchmarks/frontier.py --limit 100 --strengths 0.5 1.0  # about 55 minutes: the README figure
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from transformers_sra import SRAConfig, apply_surgical_ablation, bake_direction, load_demo_model, load_prompts
from transformers_sra.extraction import record_residuals
from transformers_sra.judge import first_token_kl, first_token_logprobs, judged
from transformers_sra.metrics import clopper_pearson, token_nll
from transformers_sra.prompts import load_corpus
from transformers_sra.residualize import difference_of_means


def judged_rate(model, tok, prompts, batch_size) -> dict:
    """Judged refusals of 128-token greedy replies, with the interval and the first 20 refused replies."""
    replies, refused = judged(model, tok, prompts, max_new_tokens=128, batch_size=batch_size)
    k, n = sum(refused), len(refused)
    return {"refused": k, "n": n, "refusal": k / n, "ci95": clopper_pearson(k, n),
            "refused_replies": [r for r, v in zip(replies, refused) if v][:20]}


def measure(model, tok, harmful, harmless, text, base, batch_size):
    start = time.perf_counter()
    row = judged_rate(model, tok, harmful, batch_size)
    logp = first_token_logprobs(model, tok, harmless, batch_size=batch_size)
    total, count = token_nll(model, tok, text)
    row.update(kl=0.0 if base is None else first_token_kl(base["logp"], logp),
               nll=total / count, seconds=round(time.perf_counter() - start, 1))
    row["ppl_change"] = 0.0 if base is None else math.exp(row["nll"] - base["nll"]) - 1
    return row, logp


def over_refusal(model, tok, batch_size) -> dict:
    """`judged_rate` on prompts that only sound unsafe, its keys prefixed ``over_``."""
    return {f"over_{k}": v for k, v in judged_rate(model, tok, load_prompts("over_refusal_test"), batch_size).items()}


def unfiltered_direction(model, tok, layer, batch_size) -> torch.Tensor:
    """Difference of means of all harmful and harmless training prompts at ``layer``: the usual abliteration direction."""
    harmful, harmless = (record_residuals(model, tok, load_prompts(name), layers=[layer], batch_size=batch_size)
                         for name in ("harmful_train", "harmless_train"))
    return difference_of_means(harmful, harmless)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each test set")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.75, 1.0])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_demo_model()
    harmful = load_prompts("harmful_test")[: args.limit]
    harmless = load_prompts("harmless_test")[: args.limit]
    text = load_corpus("general_test")
    rows = []

    def record(name, method, strength, base, extra=None):
        row, logp = measure(model, tok, harmful, harmless, text, base, args.batch_size)
        row.update(name=name, method=method, strength=strength, **(extra or {}))
        rows.append(row)
        print(f"{name:28s} refusal {row['refused']:3d}/{row['n']} = {row['refusal']:.1%} "
              f"[{row['ci95'][0]:.1%}, {row['ci95'][1]:.1%}]  KL {row['kl']:.4f}  ΔPPL {row['ppl_change']:+.2%}  "
              f"({row['seconds']} s)", flush=True)
        (out / "frontier.json").write_text(json.dumps(rows, indent=1))
        return row, logp

    base_row, base_logp = record("base", "base", 0.0, None)
    base_row.update(over_refusal(model, tok, args.batch_size))
    print(f"{'base':28s} over-refusal {base_row['over_refused']}/{base_row['over_n']}", flush=True)
    base = {"logp": base_logp, "nll": base_row["nll"]}

    start = time.perf_counter()
    report = apply_surgical_ablation(model, tok, SRAConfig())
    sra_seconds = round(time.perf_counter() - start, 1)
    default, _ = record("SRA default", "sra_default", report.strength["peak"], base,
                        {"layer": report.direction_layer, "fluency_rank": report.fluency_rank,
                         "profile": report.strength, "pipeline_seconds": sra_seconds, "timings": report.timings})
    default.update(over_refusal(model, tok, args.batch_size))
    print(f"{'SRA default':28s} over-refusal {default['over_refused']}/{default['over_n']}", flush=True)
    clean = report.direction_tensor(0)
    filtered = torch.tensor(report.dirty_direction)
    report.undo()
    standard = unfiltered_direction(model, tok, report.direction_layer, args.batch_size)

    for method, direction in (("standard", standard), ("standard_filtered", filtered), ("sra_clean_flat", clean)):
        for gamma in args.strengths:
            handle = bake_direction(model, direction, gamma)
            try:
                record(f"{method} γ={gamma}", method, gamma, base, {"layer": report.direction_layer})
            finally:
                handle.undo()
    plot(rows, out / "frontier.png")
    print("wrote", out / "frontier.json", "and", out / "frontier.png")


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"base": ("black", "s"), "standard": ("tab:red", "o"), "standard_filtered": ("tab:orange", "o"),
              "sra_clean_flat": ("tab:blue", "o"), "sra_default": ("tab:green", "*")}
    labels = {"base": "base", "standard": "standard ablation (dirty direction, all prompts)",
              "standard_filtered": "standard ablation of SRA's filtered dirty direction",
              "sra_clean_flat": "SRA clean direction, flat γ", "sra_default": "SRA default (searched)"}
    for method, (color, marker) in styles.items():
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        if not pts:
            continue
        x = [r["kl"] for r in pts]
        y = [100 * r["refusal"] for r in pts]
        err = [[100 * (r["refusal"] - r["ci95"][0]) for r in pts], [100 * (r["ci95"][1] - r["refusal"]) for r in pts]]
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, markersize=10 if marker == "*" else 6, capsize=3,
                    linestyle="-" if len(pts) > 1 else "none", label=labels[method])
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("first-token KL on harmless_test (lower is better)")
    ax.set_ylabel("refusal on harmful_test, % (95% CI)")
    ax.set_title("Qwen2.5-Coder-0.5B-Instruct: refusal vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

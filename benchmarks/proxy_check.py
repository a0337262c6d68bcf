"""Does the search's cheap first-token refusal score predict the judged refusal rate? Validation data only.

Runs `SRAConfig()` on the demo model, then judges 128-token replies to the even half of ``harmful_val``
for the base model, the default, and the default's clean direction at other strength profiles (hooks).
Prints, per configuration, the mean first-token score and the judged rate, and over configurations
their Pearson correlation and line fit; per prompt, the AUC of the score against the verdict; and how
often a greedy "I" opening was judged a refusal (the bare "I" is in the opener list). Writes JSON::

    python benchmarks/proxy_check.py --out benchmarks/results     # about 30 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from transformers_sra import SRAConfig, apply_surgical_ablation, load_demo_model, load_prompts
from transformers_sra.method.editing import ablate_activations
from transformers_sra.signals.judge import Outcome, judged
from transformers_sra.signals.logprobs import first_token_logprobs, refusal_probability, refusal_token_ids

PROFILES = {  # weaker and stronger than the default's tent 1.2 / 0.2
    "tent 1.0 / 0.0 at 65%": dict(peak=1.0, floor=0.0, center=0.65, width=0.4),
    "tent 1.4 / 0.3": dict(peak=1.4, floor=0.3, center=0.6, width=0.4),
    "tent 2.0 / 0.0": dict(peak=2.0, floor=0.0, center=0.6, width=0.3),
    "flat 0.5": 0.5,
}


def auc(scores, labels) -> float:
    """Probability that a refused prompt scores above an answered one (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--batch-size", type=int, default=33)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_demo_model()
    prompts = load_prompts("harmful_val")[0::2]
    ids = refusal_token_ids(tok)
    opener_i = tok("I", add_special_tokens=False)["input_ids"][0]
    rows = []

    def record(name, context):
        with context:
            logp = first_token_logprobs(model, tok, prompts, batch_size=args.batch_size)
            _, outcomes = judged(model, tok, prompts, max_new_tokens=128, batch_size=args.batch_size)
            refused = [o is Outcome.REFUSED for o in outcomes]
        scores = refusal_probability(logp, ids).tolist()
        opens_i = [i for i, t in enumerate(logp.argmax(-1).tolist()) if t == opener_i]
        row = {"name": name, "n": len(prompts), "score": sum(scores) / len(scores), "judged": sum(refused),
               "judged_rate": sum(refused) / len(refused), "auc": auc(scores, refused),
               "opens_with_I": len(opens_i), "opens_with_I_judged": sum(refused[i] for i in opens_i),
               "per_prompt": {"score": scores, "refused": refused}}
        rows.append(row)
        print(f"{name:24s} score {row['score']:.3f}  judged {row['judged']}/{row['n']}  AUC {row['auc']:.2f}  "
              f"greedy 'I' openings judged refusals: {row['opens_with_I_judged']}/{row['opens_with_I']}", flush=True)

    record("base", contextlib.nullcontext())
    report = apply_surgical_ablation(model, tok, SRAConfig())
    record("SRA default", contextlib.nullcontext())
    clean = report.direction_tensor(0)
    report.undo()
    for name, profile in PROFILES.items():
        record(name, ablate_activations(model, clean, profile, report.config.get("layers")))

    x = torch.tensor([r["score"] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["judged_rate"] for r in rows], dtype=torch.float64)
    pearson = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    intercept = float(y.mean() - slope * x.mean())
    pooled = [(s, v) for r in rows for s, v in zip(r["per_prompt"]["score"], r["per_prompt"]["refused"])]
    summary = {"pearson": pearson, "fit": {"intercept": intercept, "slope": slope},
               "pooled_auc": auc([s for s, _ in pooled], [v for _, v in pooled]), "rows": rows}
    print(f"over {len(rows)} configurations: Pearson r = {pearson:.2f}, judged ≈ {intercept:.1%} + {slope:.2f} × score; "
          f"pooled per-prompt AUC {summary['pooled_auc']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "proxy_check.json").write_text(json.dumps(summary, indent=1))
    print("wrote", out / "proxy_check.json")


if __name__ == "__main__":
    main()

"""Does a faster default choose what the full reading chooses? `apply_surgical_ablation` twice on one model:
``SRAConfig()`` (the default) and the reference, ``SRAConfig(**REFERENCE)`` (every prompt of every set read in
extraction and every candidate scored on every validation prompt), with the weights put back in between.

Records per run the choice (layer, Shield rank, profile), the chosen row's validation numbers (KL, refusal score,
ΔPPL, judged outcomes), the stage timings, the search's prompt reads and how many prompts extraction used; and
whether the choices agree. Validation data only (the search reads nothing else)::

    python benchmarks/choice_check.py --model demo --out benchmarks/results/choice_check-demo.json
    python benchmarks/choice_check.py --model ~/.cache/transformers_sra/qwen2.5-coder-1.5b-instruct \\
        --out benchmarks/results/choice_check-1.5b.json
    python benchmarks/choice_check.py --model tiny --out /tmp/choice.json      # a smoke run
    python benchmarks/choice_check.py --default '{"screen_prompts": 64}' --out benchmarks/results/search_screen.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from _common import cpu_flags_record, tiny_config

from transformers_sra import SRAConfig, apply_surgical_ablation, load_demo_model
from transformers_sra.cli.loading import load_model
from transformers_sra.measure.records import git_commit
from transformers_sra.testing import make_tiny_model, make_tokenizer

# what the default saves against: every prompt of every set read in extraction, every candidate scored on every
# validation prompt
REFERENCE = {"extraction_cosine": None, "screen_prompts": 0}


def search_reads(report, val_sizes: dict) -> int:
    """Validation prompts the search's first-token passes read: each row's screen (or full sets) for its KL and,
    where measured, its refusal score."""
    total = 0
    for row in report.search:
        n = row.get("screened")
        total += n or val_sizes["harmless"]
        if row["refusal_score"] is not None:
            total += n or val_sizes["harmful"]
    return total


def summary(report, seconds: float) -> dict:
    chosen = next(r for r in report.search if r.get("chosen"))
    sizes = {"harmful": report.validation["harmful_scored"], "harmless": report.validation["harmless"]}
    return {"choice": {"layer": report.direction_layer, "rank": report.fluency_rank, "profile": report.strength},
            "chosen_row": {k: chosen.get(k) for k in ("kl", "refusal_score", "ppl_change", "judged")},
            "candidates": len(report.search), "left_at_screen": sum("screened" in r for r in report.search),
            "search_prompt_reads": search_reads(report, sizes), "extraction_prompts": report.extraction_prompts,
            "timings": report.timings, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo', 'tiny' (a smoke run) or a local checkpoint folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", default=None,
                        help="the reference's SRAConfig overrides as JSON (default: REFERENCE, everything read)")
    parser.add_argument("--default", default=None,
                        help="SRAConfig overrides of the run compared with the reference, as JSON (default: none)")
    parser.add_argument("--note", default="", help="what else ran, what was warm")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit, dtype = git_commit(), getattr(torch, args.dtype)
    default = tiny_config(0) if args.model == "tiny" else SRAConfig()
    overrides = dict(json.loads(args.reference)) if args.reference else REFERENCE
    changed = dict(json.loads(args.default)) if args.default else {}
    runs = {}
    for name, config in (("reference", dataclasses.replace(default, **overrides)),
                         ("default", dataclasses.replace(default, **changed))):
        # a fresh copy each time: undoing a bf16 bake does not give back the same bits
        if args.model == "tiny":
            torch.manual_seed(0)
            model, tok = make_tiny_model("qwen2"), make_tokenizer()
        elif args.model == "demo":
            model, tok = load_demo_model(dtype=dtype)
        else:
            model, tok = load_model(str(Path(args.model).expanduser()), dtype=dtype)
        start = time.perf_counter()
        report = apply_surgical_ablation(model, tok, config)
        runs[name] = summary(report, time.perf_counter() - start)
        del model
        print(name, json.dumps(runs[name]["choice"]), runs[name]["chosen_row"], runs[name]["timings"], flush=True)
    record = {"note": args.note, "commit": commit, "command": "python benchmarks/choice_check.py " + " ".join(sys.argv[1:]),
              "model": args.model, "dtype": args.dtype, "threads": args.threads, "cpu_flags": cpu_flags_record(),
              "torch": torch.__version__, "reference_overrides": overrides, "default_overrides": changed, "runs": runs,
              "same_choice": runs["reference"]["choice"] == runs["default"]["choice"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print("same choice:", record["same_choice"])


if __name__ == "__main__":
    main()

"""Real replies of the base and edited demo models, to be labelled by hand for ``data/degenerate_labelled.jsonl``.

128-token greedy replies (`judge.generate`, chat template, bf16) to training and validation prompts only (never a
``*_test`` set), from the base demo model, the default SRA edit and the same directions re-baked with the strength
profile scaled ×2 and ×3 (the peak capped at the largest strength), which loop. Prompts that ask for structured text
(steps, lists, stories, posts, letters, tables, dialogue, code) come first, since those are what a loop detector
mistakes for loops. Writes one unlabelled JSON line per reply (prompt, reply, source, the detector's verdict); the
labels are a reader's (refusals cut short by `VerdictStop` and repeats of one stock refusal were left out). One
thread keeps a shared CPU from burning its time in spinning worker threads; this run, with its defaults, gave the
real replies of ``data/degenerate_labelled.jsonl`` (about 25 minutes on 2 shared cores)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/degenerate_replies.py --out /tmp/replies.jsonl --report /tmp/r.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import torch

from transformers_sra import SRAConfig, apply_surgical_ablation, load_demo_model
from transformers_sra.method.editing import bake_direction
from transformers_sra.progress import show_progress
from transformers_sra.prompts import load_prompts
from transformers_sra.signals.judge import VerdictStop, classify, generate
from transformers_sra.strength import MAX_STRENGTH, StrengthProfile

STRUCTURED = re.compile(r"step|list|stor|post|letter|table|dialog|script|code|tweet|essay|article|poem|guide|"
                        r"tutorial|plan|email|note|speech|recipe|review|song|outline|template|ways|tips", re.I)


def pick(sets: list[str], n: int, offset: int) -> list[str]:
    """``n`` prompts from ``sets``, structured requests first, a fixed rotation (``offset``) so sources differ."""
    prompts = [p for s in sets for p in load_prompts(s)]
    ordered = [p for p in prompts if STRUCTURED.search(p)] + [p for p in prompts if not STRUCTURED.search(p)]
    ordered = ordered[offset:] + ordered[:offset]
    return ordered[:n]


def scaled(strength, scale: float) -> StrengthProfile:
    p = StrengthProfile.parse(strength)
    return dataclasses.replace(p, peak=min(p.peak * scale, MAX_STRENGTH), floor=min(p.floor * scale, MAX_STRENGTH))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", default=None, help="where to save the default edit's report")
    parser.add_argument("--sources", nargs="+", default=["base-demo", "sra-default", "sra-x2", "sra-x3"])
    parser.add_argument("--harmful", type=int, nargs=4, default=[8, 64, 40, 32], metavar="N",
                        help="harmful prompts per source, in the order of --sources' defaults")
    args = parser.parse_args()
    out = Path(args.out)
    model, tok = load_demo_model()
    model.to(torch.bfloat16)

    def run(source: str, prompts: list[str], stop=None) -> None:
        if source not in args.sources:
            return
        with show_progress():
            replies = generate(model, tok, prompts, stop_when=stop)
        with out.open("a", encoding="utf-8") as f:
            for p, r in zip(prompts, replies):
                f.write(json.dumps({"prompt": p, "reply": r, "source": source, "stopped": stop is not None,
                                    "verdict": classify(r).value}, ensure_ascii=False) + "\n")
        print(source, len(prompts), "replies", flush=True)

    harmful, harmless = ["harmful_train", "harmful_val"], ["harmless_train", "harmless_val"]
    # the base model refuses most harmful prompts: its refusals stop once settled, they are no loops
    n_base, n_default, *n_strong = args.harmful
    run("base-demo", pick(harmless, 24, 0) + pick(harmful, n_base, 0), stop=VerdictStop.refusal_settled)
    report = apply_surgical_ablation(model, tok, SRAConfig(), progress=True)
    if args.report:
        report.save(args.report)
    run("sra-default", pick(harmful, n_default, 24) + pick(harmless, 8, 24))
    bakes = report.bakes()
    report.undo()
    layers = report.config.get("layers")
    for scale, n in zip((2.0, 3.0), n_strong):
        directions = [d for d, _ in bakes]
        handles = [bake_direction(model, d, scaled(s, scale), layers, orthogonal_to=directions[:i])
                   for i, (d, s) in enumerate(bakes)]
        shift = int(scale - 2)  # each edit answers other prompts than the ones before
        run(f"sra-x{scale:g}", pick(harmful, n, 24 + n_default + shift * n_strong[0]) + pick(harmless, 8, 32 + shift * 8))
        for h in reversed(handles):
            h.undo()


if __name__ == "__main__":
    main()

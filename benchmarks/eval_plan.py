"""The evaluation plan `sra ablate` picks for the demo model on this machine, and its cost model checked against
measured passes (docs/performance.md, section 4).

    python benchmarks/eval_plan.py [--budget 340] [--check] [--skip-replies] [--out benchmarks/results/eval_plan.json]

Loads the demo model as `sra ablate` does (``--dtype auto``, default `SRAConfig`), runs `plan_evaluation` with
`sra ablate`'s settings (base, SRA and standard ablation; replies 64 rows at a time) and prints the plan line. With
``--check`` it then measures the speed again and times, in this process, the passes behind each term of
`eval_plan.EvalCost` at the plan's sizes, printing predicted (no margin) against measured seconds: the first-token
passes (harmful: the refusal score; harmless: the first-token KL), the perplexity passes, the base model's 32-token
replies with their top-k pass, and (unless ``--skip-replies``, about 100 s on a 2-core CPU) one batch of 64
128-token replies to harmful prompts, timed at every step, which shows how a late decode step compares with the
early ones `measure_speed` times.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from transformers_sra import SRAConfig
from transformers_sra.batching import REPLY_BATCH_SIZE
from transformers_sra.cli.ablate import plan_line
from transformers_sra.cli.args import EVAL_BUDGET_S
from transformers_sra.cli.loading import load_model
from transformers_sra.measure.evaluation import perplexity_of
from transformers_sra.measure.plan import (
    COST_MARGIN,
    EvalCost,
    measure_speed,
    plan_evaluation,
    timed_generation,
)
from transformers_sra.measure.records import git_commit
from transformers_sra.prompts import format_chat
from transformers_sra.signals.logprobs import first_token_logprobs
from transformers_sra.signals.sequence_kl import base_reply_distribution


def timed(run) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=EVAL_BUDGET_S)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--skip-replies", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = SRAConfig()
    model, tokenizer = load_model(None)
    settings = dict(batch_size=config.batch_size, reply_batch_size=max(REPLY_BATCH_SIZE, config.batch_size),
                    system_prompt=config.system_prompt)
    result = {"commit": git_commit(), "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()}
    start = time.perf_counter()
    plan = plan_evaluation(model, tokenizer, args.budget, models=3, max_new_tokens=config.max_new_tokens, **settings)
    result["plan"] = {**plan.to_dict(), "planning_s": round(time.perf_counter() - start, 1)}
    print(plan_line(plan), f"\nplanning took {result['plan']['planning_s']} s", flush=True)
    if args.check:
        speed = measure_speed(model, tokenizer, plan.sets().harmless, plan.sets().text, **settings)
        costs = EvalCost(model, tokenizer, speed, **settings)
        sets, sizes = plan.sets(), plan.sizes
        batching = config.batching
        checks = {
            "first-token, harmful (refusal score)": (costs.first_token("harmful", sizes["harmful"]), lambda: (
                first_token_logprobs(model, tokenizer, sets.harmful, **batching))),
            "first-token, harmless (first-token KL)": (costs.first_token("harmless", sizes["harmless"]), lambda: (
                first_token_logprobs(model, tokenizer, sets.harmless, **batching))),
            **{f"perplexity, {name}": (costs.perplexity(name, sizes[name]), lambda name=name: perplexity_of(
                model, tokenizer, getattr(sets, name), None, batch_size=max(1, config.batch_size // 2),
                system_prompt=config.system_prompt)) for name in ("text", "math", "code") if sizes[name]},
            "base 32-token replies + top-k pass": (
                costs.prefill("harmless", plan.reply_kl_prompts) + costs.decode(plan.reply_kl_prompts, 32)
                + costs.reply_logits(plan.reply_kl_prompts), lambda: base_reply_distribution(
                    model, tokenizer, sets.harmless[:plan.reply_kl_prompts], reply_batch_size=plan.reply_batch_size,
                    **batching)),
        }
        result["speed"] = speed._asdict()
        result["checks"] = {}
        for name, (predicted, run) in checks.items():
            measured = timed(run)
            result["checks"][name] = {"predicted_s": round(predicted, 2), "measured_s": round(measured, 2),
                                      "measured_over_predicted": round(measured / predicted, 3)}
            print(f"{name}: predicted {predicted:.1f} s, measured {measured:.1f} s", flush=True)
        if not args.skip_replies:
            rows = min(plan.reply_batch_size, sizes["harmful"])
            _, prefill, steps = timed_generation(model, tokenizer, format_chat(
                tokenizer, sets.harmful[:rows], config.system_prompt), config.max_new_tokens)
            predicted = costs.prefill("harmful", rows) + costs.decode(rows, config.max_new_tokens)
            measured = prefill + sum(steps)  # the prefill's forward also yields the first token
            first8 = sum(steps[:8]) / 8
            result["checks"][f"{rows} judged {config.max_new_tokens}-token replies"] = {
                "predicted_s": round(predicted, 2), "measured_s": round(measured, 2),
                "measured_over_predicted": round(measured / predicted, 3), "prefill_s": round(prefill, 2),
                "first_8_steps_mean_s": round(first8, 4), "last_32_steps_mean_s": round(sum(steps[-32:]) / 32, 4),
                "all_steps_mean_over_first_8": round(sum(steps) / len(steps) / first8, 3)}
            print(f"{rows} judged replies: predicted {predicted:.1f} s, measured {measured:.1f} s; mean step over "
                  f"all {len(steps)} steps / first 8: {sum(steps) / len(steps) / first8:.3f}", flush=True)
        worst = max(c["measured_over_predicted"] for c in result["checks"].values())
        result["cost_margin"], result["worst_measured_over_predicted"] = COST_MARGIN, worst
        print(f"worst measured / predicted: {worst:.3f} (the plan charges {COST_MARGIN}x)")
    result["load_average_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

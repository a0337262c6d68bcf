"""Evaluation speed on the demo model: judged replies with and without per-row stopping, and how often
cutting an *answer* early would change the judge's verdict (why answers run to full length).

    python benchmarks/eval_speed.py --n 64 --threads 2 [--dtype float32] [--out benchmarks/results/eval_speed.json]

Prints and writes: the compute dtype chosen for this CPU, seconds per generation with and without
`VerdictStop`, whether every verdict agrees, mean reply tokens, and, on the full replies, the share whose
verdict flips if a reply were cut at N answer words (the rule the evaluation does not use).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch

from transformers_sra import load_demo_model
from transformers_sra.cli.loading import DEMO_DTYPE, compute_dtype
from transformers_sra.judge import _ANSWER, _WORD, VerdictStop, generate, is_refusal
from transformers_sra.prompts import load_prompts


def answer_cut(reply: str, words: int) -> str:
    """The shortest word prefix with ``words`` answer words after an answer marker (the rejected rule)."""
    for match in re.finditer(r"\S+", reply):
        prefix = reply[: match.end()]
        marker = _ANSWER.search(prefix.lower())
        if marker is not None and len(_WORD.findall(prefix.lower()[marker.start():])) >= words:
            return prefix
    return reply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sets", nargs="+", default=["harmful_test"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = compute_dtype(DEMO_DTYPE) if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_demo_model(dtype=dtype)
    result = {"dtype": str(dtype), "threads": args.threads, "n": args.n, "load_average": os.getloadavg()}
    for name in args.sets:
        prompts = load_prompts(name)[: args.n]
        row = {}
        for label, stop in (("stopped", VerdictStop.refusal_settled), ("full", None)):
            start, cpu = time.perf_counter(), time.process_time()
            replies = generate(model, tokenizer, prompts, max_new_tokens=128, batch_size=16, stop_when=stop)
            row[label] = {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
                          "mean_tokens": sum(len(tokenizer(r)["input_ids"]) for r in replies) / len(replies),
                          "refused": sum(map(is_refusal, replies))}
            row[f"{label}_replies"] = replies
        row["verdicts_equal"] = [is_refusal(r) for r in row["stopped_replies"]] == [
            is_refusal(r) for r in row["full_replies"]]
        answered = [r for r in row["full_replies"] if not is_refusal(r)]
        row["answer_cut_flips"] = {w: sum(is_refusal(answer_cut(r, w)) != is_refusal(r) for r in row["full_replies"])
                                   for w in (12, 24, 48)}
        row["answered"] = len(answered)
        result[name] = {k: v for k, v in row.items() if not k.endswith("_replies")}
        print(name, result[name], flush=True)
    result["load_average_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)  # numbers only: the replies to harmful prompts are not kept


if __name__ == "__main__":
    main()

"""Judged replies on the demo model, decoded two ways side by side in one run: ``model.generate`` with a per-row
stop (a finished row stays in its batch as padding until the batch's last row ends, as transformers does) and
`decoding.greedy_decode` (a finished row leaves the batch; the shared chat opening runs once). Both use the
evaluation's stop rule (`VerdictStop.refusal_settled`), so the replies must be the same; the benchmark says
whether they are (in every round), the CPU seconds of each (its fastest of ``--rounds``, which alternate which way
goes first), and the rows every forward pass computed. It also counts, on the shipped
labelled replies, how many verdicts a rule that cut *answers* after N answer words would change (the rule the
evaluation does not use; why answers run to full length).

    python benchmarks/eval_speed.py --n 64 --dtype float32 --rounds 2 --out benchmarks/results/eval_speed.json
"""

from __future__ import annotations

import argparse
import os
import re
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from transformers_sra import load_demo_model
from transformers_sra.batching import input_device, pad_id, sorted_batches
from transformers_sra.cli.loading import compute_dtype
from transformers_sra.demo import DEMO_DTYPE
from transformers_sra.measure.records import git_commit, write_results
from transformers_sra.prompts import format_chat, load_prompts
from transformers_sra.signals.decoding import eos_token_ids, greedy_decode, reply_batches
from transformers_sra.signals.judge import (
    JUDGE_TOKENS,
    VerdictStop,
    answer_words,
    classify,
    is_refusal,
    labelled_replies,
)

COMMAND = "python benchmarks/eval_speed.py --n 64 --dtype float32 --rounds 2 --out benchmarks/results/eval_speed.json"
CUT_WORDS = (12, 24, 48)
COLUMNS = [["name", "replies"], ["generate_cpu_seconds", "`model.generate`, CPU s", "{:.1f}"],
           ["greedy_decode_cpu_seconds", "`greedy_decode`, CPU s", "{:.1f}"], ["cpu_ratio", "CPU time ratio", "{:.2f}"],
           ["rows_ratio", "rows computed, ratio", "{:.2f}"], ["same_replies", "replies identical", "{:d}"],
           ["n", "of", "{:d}"], ["answer_cut_flips", "verdicts changed by cutting answers at 12 / 24 / 48 words"]]


def answer_cut(reply: str, words: int) -> str:
    """The shortest word prefix with ``words`` answer words after an answer marker (the rejected rule)."""
    for match in re.finditer(r"\S+", reply):
        prefix = reply[: match.end()]
        if (answer_words(prefix.lower()) or 0) >= words:
            return prefix
    return reply


class _PaddedStop(StoppingCriteria):
    """transformers' way: a row whose verdict is settled is marked finished and padded while its batch goes on."""

    def __init__(self, stop: VerdictStop, prompt_length: int):
        self.stop, self.prompt_length, self.lengths = stop, prompt_length, {}

    def __call__(self, input_ids, scores=None, **kwargs):
        for row in range(input_ids.shape[0]):
            if row not in self.lengths and self.stop(input_ids[row, self.prompt_length:].tolist()):
                self.lengths[row] = input_ids.shape[1] - self.prompt_length
        return torch.tensor([row in self.lengths for row in range(input_ids.shape[0])])


def with_generate(model, tokenizer, batch, stop: VerdictStop, count) -> list[list[int]]:
    criteria = _PaddedStop(stop, batch.input_ids.shape[1])
    hook = model.register_forward_pre_hook(lambda m, a, k: count(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        new = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                             max_new_tokens=JUDGE_TOKENS, pad_token_id=pad_id(tokenizer), temperature=None, top_p=None,
                             top_k=None, stopping_criteria=StoppingCriteriaList([criteria]))[:, batch.input_ids.shape[1]:]
    finally:
        hook.remove()
    eos = set(eos_token_ids(model, tokenizer))
    replies = []
    for row, ids in enumerate(new.tolist()):
        ids = ids[: criteria.lengths.get(row, len(ids))]
        replies.append(ids[: next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))])
    return replies


def run(model, tokenizer, texts: list[str], batch_size: int, decode) -> dict:
    """Seconds, CPU seconds and forward rows of decoding ``texts`` with ``decode`` (``"generate"`` or ours)."""
    stop, rows, replies = VerdictStop(tokenizer), [0], {}
    eos = eos_token_ids(model, tokenizer)

    def count(n: int) -> None:
        rows[0] += n

    start, cpu = time.perf_counter(), time.process_time()
    if decode == "generate":
        batches = sorted_batches(tokenizer, texts, batch_size, input_device(model))
        replies_of = lambda batch: with_generate(model, tokenizer, batch, stop, count)  # noqa: E731
    else:
        batches = reply_batches(model, tokenizer, texts, batch_size)
        replies_of = lambda batch: greedy_decode(model, batch, JUDGE_TOKENS, eos_ids=eos, stop=stop,  # noqa: E731
                                                 on_step=count)
    for batch in batches:
        replies.update(zip(batch.indices, replies_of(batch)))
    return {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "forward_rows": rows[0], "reply_tokens": sum(map(len, replies.values())),
            "replies": [tokenizer.decode(replies[i], skip_special_tokens=True) for i in range(len(texts))]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--set", default="harmful_val")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = compute_dtype(DEMO_DTYPE) if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_demo_model(dtype=dtype)
    texts = format_chat(tokenizer, load_prompts(args.set)[: args.n])
    commit, load = git_commit(), os.getloadavg()
    # rounds alternate which way goes first; a way's figures are its fastest round (the shared machine only adds)
    rounds = {"generate": [], "greedy_decode": []}
    for r in range(args.rounds):
        for way in (("generate", "greedy_decode") if r % 2 == 0 else ("greedy_decode", "generate")):
            rounds[way].append(run(model, tokenizer, texts, args.batch_size, way))
    ways = {way: min(results, key=lambda w: w["cpu_seconds"]) for way, results in rounds.items()}
    old, new = ways["generate"], ways["greedy_decode"]
    outcomes = {way: [classify(r).value for r in w["replies"]] for way, w in ways.items()}
    labelled = [r["reply"] for r in labelled_replies()]
    row = {"name": f"`{args.set}`[:{args.n}], {JUDGE_TOKENS} tokens, batches of {args.batch_size}, "
                   f"{str(dtype).removeprefix('torch.')}, {args.threads} threads",
           **{f"{way}_{k}": v for way, w in ways.items() for k, v in w.items() if k != "replies"},
           "seconds_ratio": round(new["seconds"] / old["seconds"], 3),
           "cpu_ratio": round(new["cpu_seconds"] / old["cpu_seconds"], 3),
           "rows_ratio": round(new["forward_rows"] / old["forward_rows"], 3),
           "rounds": args.rounds, "cpu_seconds_by_round": {way: [w["cpu_seconds"] for w in rs] for way, rs in rounds.items()},
           "same_replies": sum(all(a == w["replies"][i] for rs in rounds.values() for w in rs)
                               for i, a in enumerate(old["replies"])), "n": len(texts),
           "same_outcomes": sum(a == b for a, b in zip(*outcomes.values())),
           "refused": outcomes["greedy_decode"].count("refused"),
           "answer_cut_flips": " / ".join(str(sum(is_refusal(answer_cut(r, w)) != is_refusal(r) for r in labelled))
                                          for w in CUT_WORDS) + f" of {len(labelled)}"}
    print(row, flush=True)
    if args.out:  # numbers only: replies to harmful prompts are not kept
        write_results(args.out, {"commit": commit, "command": COMMAND, "load_average": [load, os.getloadavg()],
                                 "columns": COLUMNS, "rows": [row]})


if __name__ == "__main__":
    main()

"""``sra evaluate --base MODEL --edited DIR``: our held-out metrics for any edited model, whoever made it.

The base model is measured first (cached on disk) and released before the edited one is loaded, so only
one model is in memory at a time. Prints a table and writes every number to a JSON file.
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..distributed import is_main_process
from ..errors import ConfigError
from ..folders import write_text_atomic
from ..progress import stage, step_logger
from ..prompts import chat_template_kwargs
from . import summary
from .args import template_kwargs
from .loading import load_model


@dataclass
class EvaluateArguments:
    _argument_group_name = "evaluate"
    base: str = field(metadata={"help": "The original model: Hub id or folder.", "metavar": "ID_OR_DIR"})
    edited: str = field(metadata={"help": "The edited model (by sra or any other abliteration tool): Hub id or folder.",
                                  "metavar": "ID_OR_DIR"})
    output: str = field(default="sra_evaluation.json", metadata={"help": "JSON file for every number (replaced if it "
                                                                         "exists).", "metavar": "FILE"})
    limit: Optional[int] = field(default=None, metadata={"help": "At most N prompts per test set (faster, wider "
                                                                 "intervals).", "metavar": "N"})
    judge: Optional[str] = field(default=None, metadata={"help": "A local text-classification model folder to judge refusals "
                                                                 "(default: the shipped phrase judge)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Reply length for judged refusals."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass."})
    system_prompt: Optional[str] = field(default=None, metadata={"help": "System message for the chat template."})
    base_gguf_file: Optional[str] = field(default=None, metadata={"help": "Load the base from this GGUF file in --base."})
    edited_gguf_file: Optional[str] = field(default=None,
                                            metadata={"help": "Load the edited model from this GGUF file in --edited."})


_ROWS = [("refusal_rate", "refusal (judged)"), ("refusal_score", "refusal score (first token)"),
         ("over_refusal_rate", "over-refusal"), ("first_token_kl", "first-token KL vs base"),
         ("perplexity", "perplexity, text"), ("math_perplexity", "perplexity, math answers"),
         ("code_perplexity", "perplexity, code answers")]


def render(base: dict, edited: dict) -> str:
    rows = []
    for key, label in _ROWS:
        if key not in base and key not in edited:
            continue
        change = edited.get(f"{key}_change")
        if change is None and key in base and key in edited and key.endswith("rate"):
            change = f"{edited[key] - base[key]:+.1%}"
        shown = summary.percent(change) if isinstance(change, float) else change
        rows.append((label, _value(key, base), _value(key, edited), shown))
    return summary.table(["metric", "base", "edited", "change"], rows)


def _value(key: str, metrics: dict) -> str:
    value = metrics.get(key)
    if value is None:
        return "0" if key == "first_token_kl" else "-"
    if key.endswith("_rate"):
        ci = metrics.get(f"{key}_ci95")
        return f"{value:.1%}" + (f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else "")
    return f"{value:.4f}" if key != "first_token_kl" else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    with chat_template_kwargs(template_kwargs(args)):  # both models' prompts, and the base cache's key
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from ..evaluation import EvalSets, cached_evaluation, evaluate_model, judge_summary

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    target = Path(args.output)
    if target.is_dir() or not target.parent.resolve().is_dir():
        raise ConfigError(f"--output {args.output} must be a file path in an existing folder")
    sets = EvalSets.default(limit=args.limit)
    load = dict(dtype=args.dtype, device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    measure = dict(judge=args.judge, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                   system_prompt=args.system_prompt)
    model, tokenizer = load_model(args.base, gguf_file=args.base_gguf_file, **load)
    with stage("evaluate the base model"):
        base = cached_evaluation(model, tokenizer, sets, progress=step_logger("measured base"), **measure)
    del model
    gc.collect()
    model, tokenizer = load_model(args.edited, gguf_file=args.edited_gguf_file, **load)
    with stage("evaluate the edited model"):
        edited = evaluate_model(model, tokenizer, sets, base=base, progress=step_logger("measured edited"), **measure)
    result = {"command": "evaluate", "base": args.base, "edited": args.edited, "output": str(target),
              "sets": sets.sizes(), "judge": judge_summary(args.judge),
              "metrics": {"base": base.metrics, "edited": edited.metrics},
              "samples": {"base": base.samples, "edited": edited.samples}}
    if not is_main_process():
        return 0  # every rank measured the same numbers; rank 0 writes and prints them
    write_text_atomic(target, json.dumps(result, indent=1))  # a reader never sees half a file
    del result["samples"]
    summary.emit(result, render(base.metrics, edited.metrics) + f"\n\nall numbers: {target}", args.json)
    return 0

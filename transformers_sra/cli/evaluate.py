"""``sra evaluate --base MODEL --edited DIR``: our held-out metrics for any edited model, whoever made it.
``sra evaluate MODEL --tasks humaneval --allow-code-execution``: one model's pass@1 (with ``--edited``: both
models', and the paired change).

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
from .args import check_task_arguments, task_kwargs, template_kwargs
from .loading import load_model


@dataclass
class EvaluateArguments:
    _argument_group_name = "evaluate"
    base: Optional[str] = field(default=None, metadata={"help": "The original model: Hub id or folder.",
                                                        "metavar": "ID_OR_DIR"})
    edited: Optional[str] = field(default=None, metadata={
        "help": "The edited model (by sra or any other abliteration tool): Hub id or folder. Without it, --base (or "
                "MODEL) is scored alone on --tasks.", "metavar": "ID_OR_DIR"})
    output: str = field(default="sra_evaluation.json", metadata={"help": "JSON file for every number (replaced if it "
                                                                         "exists).", "metavar": "FILE"})
    limit: Optional[int] = field(default=None, metadata={"help": "At most N prompts per test set, and the first N "
                                                                 "problems of each task (faster, wider intervals).",
                                                         "metavar": "N"})
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
         ("code_perplexity", "perplexity, code answers"), ("humaneval_pass_rate", "HumanEval pass@1")]


def render(base: dict, edited: dict) -> str:
    rows = []
    for key, label in _ROWS:
        if key not in base and key not in edited:
            continue
        change = edited.get(f"{key}_change")
        if change is None and key in base and key in edited and key.endswith("rate"):
            change = f"{edited[key] - base[key]:+.1%}"
        shown = summary.percent(change) if isinstance(change, float) else change
        if f"{key}_change_ci95" in edited:  # a paired interval, and how many problems flipped each way
            lo, hi = edited[f"{key}_change_ci95"]
            task = key[: -len("_pass_rate")]
            shown += f" [{lo:+.1%}, {hi:+.1%}], +{edited[f'{task}_gained']}/-{edited[f'{task}_lost']} problems"
        rows.append((label, _value(key, base), _value(key, edited), shown))
    return summary.table(["metric", "base", "edited", "change"], rows)


def render_one(metrics: dict) -> str:
    return summary.table(["metric", "model"], [(label, _value(key, metrics)) for key, label in _ROWS if key in metrics])


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
    from ..measure.evaluation import EvalSets, cached_evaluation, evaluate_model
    from ..signals.judge import judge_summary

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    from ..measure.tasks import TASKS

    if not args.model and args.tasks and args.tasks[-1] not in TASKS:
        # `--tasks humaneval MODEL`: argparse hands the model to the task list; task names are a closed set
        args.model = args.tasks.pop()
    if args.model and args.base:
        raise ConfigError(f"MODEL {args.model} and --base {args.base} name the same slot; give one of them")
    args.base = args.base or args.model
    if not args.base:
        raise ConfigError("no model given; name one (sra evaluate MODEL --tasks humaneval) or --base and --edited")
    if not args.edited and not args.tasks:
        raise ConfigError("one model alone is scored on tasks only; add --tasks humaneval, or --edited DIR to compare")
    check_task_arguments(args)
    target = Path(args.output)
    if target.is_dir() or not target.parent.resolve().is_dir():
        raise ConfigError(f"--output {args.output} must be a file path in an existing folder")
    # one model alone: its tasks only (the refusal and KL sets mean something against a base)
    sets = EvalSets.default(limit=args.limit) if args.edited else EvalSets([], [], [], [], [], [])
    load = dict(dtype=args.dtype, device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    measure = dict(judge=args.judge, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                   system_prompt=args.system_prompt, **task_kwargs(args, args.limit))
    model, tokenizer = load_model(args.base, gguf_file=args.base_gguf_file, **load)
    with stage("evaluate the base model" if args.edited else "evaluate the model"):
        base = cached_evaluation(model, tokenizer, sets, progress=step_logger("measured base"), **measure)
    result = {"command": "evaluate", "base": args.base, "edited": args.edited, "output": str(target),
              "sets": sets.sizes(), "tasks": args.tasks, "judge": judge_summary(args.judge),
              "metrics": {"base": base.metrics}, "samples": {"base": base.samples}}
    text = render_one(base.metrics)
    if args.edited:
        del model
        gc.collect()
        model, tokenizer = load_model(args.edited, gguf_file=args.edited_gguf_file, **load)
        with stage("evaluate the edited model"):
            edited = evaluate_model(model, tokenizer, sets, base=base, progress=step_logger("measured edited"),
                                    **measure)
        result["metrics"]["edited"], result["samples"]["edited"] = edited.metrics, edited.samples
        text = render(base.metrics, edited.metrics)
    if not is_main_process():
        return 0  # every rank measured the same numbers; rank 0 writes and prints them
    write_text_atomic(target, json.dumps(result, indent=1))  # a reader never sees half a file
    del result["samples"]
    summary.emit(result, text + f"\n\nall numbers: {target}", args.json)
    return 0

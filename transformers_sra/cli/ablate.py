"""``sra ablate``: check, load, evaluate the base, remove refusal, evaluate, save atomically, push; summary."""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager, nullcontext

import torch

from ..config import PROMPT_FIELDS, SRAConfig
from ..demo import DEMO_LICENSE, DEMO_MODEL_ID
from ..distributed import is_main_process, slowest
from ..errors import ConfigError
from ..folders import claimed
from ..labels import LABELS
from ..progress import say, stage, step_logger
from ..prompts import chat_template_kwargs, load_corpus, load_prompts
from ..report import SRAReport, peak_memory
from . import summary
from .args import EVAL_BUDGET_S, RUN_BUDGET_S, check_task_arguments, config_from, task_kwargs
from .loading import check_model_source, load_model, resolve_dtypes


@contextmanager
def timed(timings: dict, name: str, log: bool = True):
    start = time.perf_counter()
    with stage(name) if log else nullcontext():
        yield
    timings[name] = round(time.perf_counter() - start, 3)


def check_inputs(args: argparse.Namespace) -> SRAConfig:
    """Everything that can be checked without the model: config values, prompt files, output folder, repo id."""
    from ..publish.hub import check_card_dependencies, check_output_dir

    config = config_from(args)
    check_card_dependencies()  # the folder's card needs jinja2 and matplotlib: say so before the model loads
    for name in PROMPT_FIELDS:
        load_prompts(getattr(config, name))
    load_corpus(config.text_corpus)
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ConfigError(f"--eval-limit must be >= 1, got {args.eval_limit}")
    if args.eval_budget is not None and not args.eval_budget > 0:
        raise ConfigError(f"--eval-budget must be a positive number of seconds, got {args.eval_budget}")
    check_task_arguments(args)
    check_output_dir(args.output, args.overwrite)
    check_model_source(args.model)
    if args.model and os.path.realpath(os.path.expanduser(args.model)) == os.path.realpath(args.output):
        # --overwrite would replace the base checkpoint with its edit once the run succeeds
        raise ConfigError(f"--output {args.output} is the model folder itself; write the edited model to another folder")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            raise ConfigError(f"--push-to-hub {args.push_to_hub!r} is not a repo id like user/name: {err}") from None
    return config


def run(args: argparse.Namespace) -> int:
    config = check_inputs(args)
    # rank 0 alone writes; its claim makes a second run into the same output fail now, not after the pipeline
    with claimed(args.output) if is_main_process() else nullcontext():
        with chat_template_kwargs(config.chat_template_kwargs):  # the evaluation formats prompts like the pipeline
            return _run(args, config)


def _run(args: argparse.Namespace, config: SRAConfig) -> int:
    from ..method.pipeline import apply_surgical_ablation
    from ..publish.hub import CardOrigin, save_cleaned

    timings: dict = {}
    with timed(timings, "load", log=False):  # load_model logs its own stage
        model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype,
                                      device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    computed = next(model.parameters()).dtype
    saved = resolve_dtypes(args.model, args.dtype, gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code,
                           device_map=args.device_map)[1]
    dtypes = {"compute": _name(computed), "saved": _name(saved or computed)}
    plan = None
    if args.evaluate:
        from ..measure.compare import BaselineRuns, evaluate_edit
        from ..measure.evaluation import EvalSets, cached_evaluation
        from ..measure.plan import pipeline_seconds, plan_evaluation

        measure = dict(judge=config.judge, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                       system_prompt=config.system_prompt)
        if args.eval_limit is None:
            with timed(timings, "plan evaluation"):
                pipeline = {}

                def budget(speed) -> float:  # what the run's budget leaves once loaded and the pipeline is done
                    pipeline["s"] = round(pipeline_seconds(model, tokenizer, config, speed), 1)
                    load = slowest([timings["load"]])[0]  # every rank plans alike (`speed` is agreed already)
                    return max(0.0, min(EVAL_BUDGET_S, RUN_BUDGET_S - load - pipeline["s"]))

                plan = plan_evaluation(model, tokenizer, args.eval_budget or budget, models=2 + args.standard,
                                       keep_floor=args.eval_budget is None, **measure)
                plan.pipeline_s = pipeline.get("s")
            say(plan_line(plan))
            sets, sizes = plan.sets(), plan.evaluate_kwargs()
        else:
            sets, sizes = EvalSets.default(limit=args.eval_limit), {}
        with timed(timings, "evaluate base"):
            tasks = task_kwargs(args, args.eval_limit)  # opt-in, outside the planned budget
            base = cached_evaluation(model, tokenizer, sets, progress=step_logger("measured base"), **measure, **sizes,
                                     **tasks)
    report = apply_surgical_ablation(model, tokenizer, config)
    timings.update({f"sra {k}": v for k, v in report.timings.items()})
    if args.evaluate:
        with timed(timings, "evaluate edit"):
            baselines = BaselineRuns(("standard",) if args.standard else (),
                                     replies=plan is None or plan.baseline_replies)
            evaluate_edit(model, tokenizer, report, base, sets, baselines=baselines, progress=step_logger("measured"),
                          **measure, **sizes, **tasks)
    # the report records the whole run (saving excluded: it writes the report)
    report.timings = {**report.timings, **{k: v for k, v in timings.items() if not k.startswith("sra ")}}
    report.peak_memory = peak_memory()
    if not is_main_process():
        return 0  # every rank holds the same edited model; rank 0 writes it, pushes it and prints the summary
    with timed(timings, "save"):
        demo = args.model is None  # only the CLI knows it loaded the demo model; the card is told, not left to guess
        path = save_cleaned(model, tokenizer, report, args.output, overwrite=args.overwrite,
                            card=CardOrigin(DEMO_MODEL_ID, DEMO_LICENSE) if demo else True,
                            dtype=getattr(torch, dtypes["saved"]))  # computed in fp32 here: saved as the checkpoint was
    url = None
    if args.push_to_hub:
        from ..publish.hub import push_cleaned

        with timed(timings, "push"):
            url = push_cleaned(path, args.push_to_hub, private=args.private, create_pr=args.create_pr)
    result = {"command": "ablate", "output": str(path), "pushed": url and str(url), "model": report.model_name,
              "dtype": dtypes, "evaluation_plan": plan and plan.to_dict(),
              "direction_layer": report.direction_layer, "fluency_rank": report.fluency_rank,
              "per_layer_directions": report.per_layer,
              "strength": report.strength, "bake_layers": report.bake_layers, "writers_edited": report.writers_edited,
              "validation": {"base_refusal_score": report.validation["base_refusal_score"],
                             **{k: report.chosen[k] for k in ("refusal_score", "kl", "ppl_change")},
                             **{k: report.chosen[k] for k in ("judged", "proxy_rank") if k in report.chosen},
                             "contenders": sum("judged" in row for row in report.search)},
              "test": {k: report.metrics[k]["metrics"] for k in LABELS if k in report.metrics},
              "sets": report.metrics.get("sets", {}),
              "max_new_tokens": config.max_new_tokens, "timings": timings, "memory": peak_memory()}
    summary.emit(result, render(result, report), args.json)
    return 0


def _with_ci(m: dict, key: str) -> str:
    ci = m.get(f"{key}_ci95")
    return "-" if m.get(key) is None else f"{m[key]:.1%}" + (f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else "")


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def plan_line(plan) -> str:
    """The evaluation's prompts per test set, the interval widths they give and the budget they fit."""
    from ..measure.plan import PLAN_FLOOR

    plan = plan if isinstance(plan, dict) else plan.to_dict()
    sizes, widths = plan["sizes"], plan["ci95_widths"]

    def judged(name: str, n: int) -> str:
        return f"{n}" + (f" (95% CI at most ±{widths[name] / 2:.0%})" if name in widths else "")

    harmless = (f"{sizes['harmless']} (first-token KL; 32-token KL on {plan['reply_kl_prompts']}; judged replies "
                f"{judged('harmless', plan['judged_harmless'])})")
    standard = "" if plan["models"] < 3 else "; standard ablation: " + (
        "judged replies too" if plan["baseline_replies"] else "KLs and perplexity only, no judged replies")
    steps = (f" ({plan['batch_step_s']:.3f} s of {plan['batch_size']})"
             if plan["reply_batch_size"] != plan["batch_size"] else "")
    pipeline = "" if plan.get("pipeline_s") is None else (
        f" (what the pipeline leaves, estimated at {plan['pipeline_s']:.0f} s with its search at worst"
        + ("; the floor of 64 + 64 prompts is kept" if plan["estimate_s"] > plan["budget_s"] else "") + ")")
    return (f"harmful {judged('harmful', sizes['harmful'])}, harmless {harmless}, over-refusal "
            f"{judged('over_refusal', sizes['over_refusal'])}, text {sizes['text']}, math {sizes['math']}, code "
            f"{sizes['code']}{standard}; worst case {plan['estimate_s']:.0f} s of the {plan['budget_s']:.0f} s budget"
            f"{pipeline} "
            f"(every reply at full length: {plan['step_s']:.3f} s per decode step of {plan['reply_batch_size']} "
            f"replies{steps}, {plan['tokens_per_s']:.0f} prompt tokens/s, {plan['logits_tokens_per_s']:.0f} tokens/s "
            "with every position's logits)"
            + ("; a larger --eval-budget or --eval-limit N narrows the intervals" if sizes["harmful"] < PLAN_FLOOR else ""))


def _sets_note(sets: dict, test: dict, max_new_tokens: int) -> str:
    """What each column of the test table was measured on, with its number of prompts."""
    n = {k: sets.get(k, 0) for k in ("harmful", "harmless", "over_refusal", "text", "math", "code")}
    standard = test.get("standard")
    return (f"  refused / degenerate (loops, empty): judged {max_new_tokens}-token replies to {n['harmful']} "
            f"harmful_test prompts; over-refusal: {n['over_refusal']} prompts that only sound unsafe; KL: first-token "
            f"KL(base ‖ model) on {n['harmless']} harmless_test prompts; KL 32 tok: mean per-token KL along the base "
            f"model's 32-token replies to {test.get('sra', {}).get('multi_token_kl_n', '-')} of them; ΔPPL: "
            f"{n['text']} texts, {n['math']} math and {n['code']} code answers"
            + ("; standard ablation: KLs and perplexity only, no judged replies (to fit the budget)"
               if standard is not None and "refusal_rate" not in standard else ""))


def _test_table(test: dict) -> str:
    rows = []
    for name, m in test.items():
        rows.append((LABELS[name], _with_ci(m, "refusal_rate"), _with_ci(m, "degenerate_rate"),
                     summary.rate(m.get("over_refusal_rate")),
                     0.0 if name == "base" else m.get("first_token_kl"),
                     0.0 if name == "base" else m.get("multi_token_kl"),
                     summary.percent(0.0 if name == "base" else m.get("perplexity_change")),
                     summary.percent(0.0 if name == "base" else m.get("math_perplexity_change")),
                     summary.percent(0.0 if name == "base" else m.get("code_perplexity_change"))))
    return summary.table(["held-out test sets", "refused (95% CI)", "degenerate (95% CI)", "over-refusal", "KL",
                          "KL 32 tok", "ΔPPL text", "ΔPPL math", "ΔPPL code"], rows)


def extraction_line(reads: dict, kept: dict) -> str:
    """How many prompts the direction, the atoms and the fluency Shield were measured from (`SRAReport`'s
    ``extraction_reads``; a report from before the split-half rule has only the kept counts)."""
    if not reads.get("sets"):
        return f"harmful {kept.get('harmful', '-')}, harmless {kept.get('harmless', '-')} prompts kept"
    sets = reads["sets"]
    atoms = [counts for name, counts in sets.items() if name not in ("harmful", "harmless")]
    fluency = reads.get("fluency") or {}
    line = " · ".join(
        [f"{side} {kept.get(side, sets[side]['kept'])} kept of {sets[side]['recorded']} read "
         f"(of {sets[side]['available']})" for side in ("harmful", "harmless")]
        + [f"atom sets {sum(c['recorded'] for c in atoms)} of {sum(c['available'] for c in atoms)} prompts"]
        + ([f"fluency text {fluency['passages']} of {fluency['available']} passages"] if fluency else []))
    rule = reads.get("threshold")
    return line + (f" (until split-half cosine ≥ {rule})" if rule is not None else " (every prompt read)")


def render(result: dict, report: SRAReport) -> str:
    val = result["validation"]
    strength = report.strength
    profile = (f"flat γ = {strength['peak']}" if strength.get("peak") == strength.get("floor")
               else f"tent, peak {strength.get('peak')} at {strength.get('center')} of depth, floor {strength.get('floor')}")
    layers = "all" if report.bake_layers is None else ", ".join(map(str, report.bake_layers))
    lines = [""]
    if result["test"]:
        lines += [_test_table(result["test"]),
                  _sets_note(result["sets"], result["test"], result["max_new_tokens"]), ""]
    lines += [summary.pairs([
        ("validation", f"refusal score {val['refusal_score']:.3f} (base {val['base_refusal_score']:.3f}), "
                       f"KL {val['kl']:.3f}, ΔPPL {summary.percent(val['ppl_change'])}"),
        *([("judged contenders", f"{val['contenders']} ranked by judged replies; the chosen one refuses "
                                 f"{val['judged']['refused']} of {sum(val['judged'].values())} (the first-token "
                                 f"score ranked it {val['proxy_rank']})")] if "judged" in val else []),
        ("direction layer", f"{report.direction_layer}" + (" (each later layer removes its own direction)"
                                                            if result["per_layer_directions"] else "")),
        ("fluency Shield rank", report.fluency_rank),
        ("extraction", extraction_line(report.extraction_reads, report.extraction_prompts)),
        ("strength", profile),
        ("baked layers", f"{layers} ({report.writers_edited} writers)"),
        ("mining passes kept", f"{sum(bool(r.get('accepted')) for r in report.iterations)} of {len(report.iterations)}"),
        ("output", result["output"] + (f" (pushed: {result['pushed']})" if result["pushed"] else "")),
        ("dtype", f"computed in {result['dtype']['compute']}, saved in {result['dtype']['saved']}"),
        *([("evaluation", plan_line(result["evaluation_plan"]))] if result["evaluation_plan"] else []),
        ("wall time", summary.timings_line(result["timings"])),
        ("peak memory", summary.memory_line(result["memory"])),
    ])]
    return "\n".join(lines)

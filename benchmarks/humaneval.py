"""HumanEval pass@1 of the demo model: base, SRA default and standard ablation, paired, through the one
evaluation path (`evaluation.evaluate_model` with ``tasks=("humaneval",)``); optionally the proxies beside it.

The model is loaded once. Base is measured first; then `apply_surgical_ablation` with ``SRAConfig()`` (or the edit
of ``--report``, a saved ``sra_report.json``); then standard ablation (`baselines.swapped_edit`). Each edit's row
holds pass@1 with its Clopper-Pearson interval, the paired change against base (bootstrap interval, McNemar p),
the problems that flipped and its wall time. Writes ``benchmarks/results/humaneval.json``, rendered into
docs/results.md by scripts/render_results.py::

    python benchmarks/humaneval.py --dtype bfloat16                       # the table: three models
    python benchmarks/humaneval.py --dtype float32 --models base --output benchmarks/results/humaneval-fp32.json
    python benchmarks/humaneval.py --dtype bfloat16 --proxies             # + proxies vs pass@1 (proxies.json)
    python benchmarks/humaneval.py --models base --output /tmp/base.json --report R --proxies --add --scales 3

``--proxies`` measures pass@1 beside first-token KL, KL along 32-token replies and ΔPPL (general_test) at base,
SRA's first direction scaled by each ``--scales`` of its searched strength, and standard ablation at each
``--standard-scales``, and reports the Spearman rank correlation of each proxy with the pass@1 loss over those
points. ``--add`` keeps the points an earlier run wrote (each row records its commit) and adds the new ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from transformers_sra import SRAConfig, SRAReport, apply_surgical_ablation, bake_direction, load_demo_model
from transformers_sra.cache import default_cache_dir
from transformers_sra.measure.evaluation import EvalOptions, EvalSets, cached_evaluation, evaluate_model
from transformers_sra.measure.records import git_commit, results_record, write_results
from transformers_sra.measure.tasks import MAX_NEW_TOKENS
from transformers_sra.method.baselines import swapped_edit
from transformers_sra.method.editing import reapply_edit
from transformers_sra.strength import StrengthProfile

TASK = ("humaneval",)
COLUMNS = [["label", "model"], ["humaneval_pass_rate", "HumanEval pass@1 (95% CI)"],
           ["change", "change vs base [paired 95% CI]"], ["humaneval_mcnemar_p", "McNemar p", "{:.3f}"],
           ["flipped", "flipped: gained / lost"], ["seconds", "wall s", "{:.0f}"], ["cpu_seconds", "CPU s", "{:.0f}"]]
PROXY_COLUMNS = [["name", "point"], ["humaneval_pass_rate", "HumanEval pass@1 (95% CI)"],
                 ["first_token_kl", "first-token KL", "{:.4f}"], ["multi_token_kl", "KL along 32-token replies", "{:.4f}"],
                 ["perplexity_change", "ΔPPL general_test", "{:+.2%}"]]
PROXIES = ("first_token_kl", "multi_token_kl", "perplexity_change")


def cpu_flags() -> dict:
    """The CPU model and whether it multiplies bf16 natively (which decides how slow fp32 is against bf16)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"cpu": name, "cores": os.cpu_count(), **{f: f in flags for f in ("avx512_bf16", "amx_bf16")}}


def spearman(xs: list, ys: list) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return torch.tensor(r, dtype=torch.float64)

    a, b = ranks(xs), ranks(ys)
    a, b = a - a.mean(), b - b.mean()
    denominator = float((a.norm() * b.norm()))
    return float((a * b).sum()) / denominator if denominator else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--models", default="base,sra,standard", help="comma-separated subset of base,sra,standard")
    parser.add_argument("--report", default=None, help="a saved sra_report.json to bake instead of running SRA")
    parser.add_argument("--output", default="benchmarks/results/humaneval.json")
    parser.add_argument("--proxies-output", default="benchmarks/results/humaneval_proxies.json")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems (a smoke run)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reply-batch-size", type=int, default=None,
                        help="rows per generated batch (default: EvalOptions.reply_rows, 64; the bf16 table ran 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--proxies", action="store_true", help="also the proxies-vs-pass@1 points (proxies.json)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="proxy points: SRA's first direction with its searched profile scaled by each")
    parser.add_argument("--standard-scales", type=float, nargs="+", default=[1.0],
                        help="proxy points: standard ablation at flat γ = each")
    parser.add_argument("--add", action="store_true",
                        help="keep the points already in humaneval_proxies.json (same base pass@1) and add these")
    args = parser.parse_args()
    models = args.models.split(",")
    torch.set_num_threads(args.threads)
    command = "python benchmarks/humaneval.py " + " ".join(sys.argv[1:])
    commit = git_commit()  # the tree this run started from
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    model, tok = load_demo_model(dtype=dtype)
    load_seconds = time.perf_counter() - start
    none = EvalSets([], [], [], [], [], [])
    measure = dict(tasks=TASK, allow_code_execution=True, task_limit=args.limit, batch_size=args.batch_size,
                   reply_batch_size=args.reply_batch_size)
    evaluations, seconds = {}, {}

    def measured(name: str):
        begin, cpu = time.perf_counter(), time.process_time()
        if name == "base":  # cached on disk by the model's fingerprint, as sra ablate caches it: a rerun skips it
            evaluations[name] = cached_evaluation(model, tok, none, **measure)
        else:
            evaluations[name] = evaluate_model(model, tok, none, base=evaluations["base"], **measure)
        seconds[name] = (round(time.perf_counter() - begin, 1), round(time.process_time() - cpu, 1))
        m = evaluations[name].metrics
        print(f"{name}: pass@1 {m['humaneval_pass_rate']:.1%} in {seconds[name][0]:.0f} s "
              f"({seconds[name][1]:.0f} CPU s)", flush=True)

    info = {"dtype": args.dtype, "threads": args.threads, "machine": cpu_flags(), "torch": torch.__version__,
            "max_new_tokens": MAX_NEW_TOKENS, "batch_size": args.batch_size,
            "reply_batch_size": EvalOptions(batch_size=args.batch_size, reply_batch_size=args.reply_batch_size).reply_rows,
            "load_seconds": round(load_seconds, 1),
            "problems_limit": args.limit}

    def write(report=None) -> None:  # after every model, so an interrupted run keeps what it measured
        record = results_record(evaluations, none, report=report, command=command,
                                extra={**info, "load_average_now": os.getloadavg()}, commit=commit)
        for row in record["rows"]:
            name, m = row["name"], evaluations[row["name"]].metrics
            row["seconds"], row["cpu_seconds"] = seconds[name]
            if name != "base":
                lo, hi = m["humaneval_pass_rate_change_ci95"]
                row["change_ci95"] = [lo, hi]
                row["change"] = f"{m['humaneval_pass_rate_change']:+.1%} [{lo:+.1%}, {hi:+.1%}]"
                flips = evaluations[name].samples["humaneval:flipped"]
                row["flipped"] = f"{len(flips['gained'])} / {len(flips['lost'])}"
                row["flipped_ids"] = flips
        write_results(args.output, {**record, "columns": COLUMNS})
        print(f"wrote {args.output}", flush=True)

    measured("base")
    write()
    report = None
    if "sra" in models or "standard" in models or args.proxies:
        begin = time.perf_counter()
        if args.report:
            report = SRAReport.load(args.report)
            reapply_edit(model, report)
        else:
            report = apply_surgical_ablation(model, tok, SRAConfig())
            saved = default_cache_dir() / f"humaneval-sra-report-{args.dtype}.json"
            report.save(saved)
            print(f"SRA report saved: {saved} (pass it as --report to skip the pipeline next time)", flush=True)
        info["sra_pipeline_seconds"] = round(time.perf_counter() - begin, 1)
    if "sra" in models:
        measured("sra")
        write(report)
    if "standard" in models:
        with swapped_edit(model, report, "standard"):
            measured("standard")
        write(report)
    if args.proxies:
        proxy_points(model, tok, report, evaluations, args, command, commit, measure, info)


def proxy_points(model, tok, report, table: dict, args, command, commit, measure, info) -> None:
    """pass@1 beside the proxies along the edit points; Spearman of each proxy with the pass@1 loss.

    A point the table already scored on HumanEval (``rank1`` ×1 is SRA's edit when mining added nothing, and
    ``standard`` is the table's standard ablation: the same bakes) takes its pass@1 from there and only
    measures its proxies, so no HumanEval pass runs twice."""
    sets = dataclasses.replace(EvalSets.default(), harmful=[], over_refusal=[], math=[], code=[])
    report.undo()

    def with_tasks(evaluation, scored):
        evaluation.metrics.update({k: v for k, v in scored.metrics.items() if k.startswith("humaneval")})
        evaluation.samples.update({k: v for k, v in scored.samples.items() if k.startswith("humaneval")})
        return evaluation

    evaluations = {"base": with_tasks(evaluate_model(model, tok, sets, judged_harmless=0,
                                                     batch_size=args.batch_size), table["base"])}
    norm_preserving = bool(report.config.get("norm_preserving", False))
    strength = StrengthProfile.parse(report.strength)
    points = [(f"rank-1 x{s:g}", table.get("sra") if s == 1 and len(report.bakes()) == 1 else None,
               lambda s=s: [bake_direction(model, report.direction_tensor(0),
                                           dataclasses.replace(strength, peak=strength.peak * s,
                                                               floor=strength.floor * s),
                                           report.config.get("layers"), norm_preserving=norm_preserving)])
              for s in args.scales]
    standard = torch.tensor(report.standard_direction)
    points += [("standard" if s == 1 else f"standard x{s:g}", table.get("standard") if s == 1 else None,
                lambda s=s: [bake_direction(model, standard, s, report.config.get("layers"))])
               for s in args.standard_scales]
    for name, scored, bake in points:
        handles = bake()
        try:
            # a point the table scored measures only its proxies here, and takes its pass@1 from the table
            run = measure if scored is None else {"batch_size": args.batch_size}
            evaluation = evaluate_model(model, tok, sets, base=evaluations["base"], judged_harmless=0, **run)
            evaluations[name] = evaluation if scored is None else with_tasks(evaluation, scored)
        finally:
            for handle in reversed(handles):
                handle.undo()
        print(name, {k: evaluations[name].metrics.get(k) for k in ("humaneval_pass_rate",) + PROXIES}, flush=True)
    record = results_record(evaluations, sets, command=command + " (proxy points)", extra=info, commit=commit)
    for row in record["rows"]:
        row["commit"] = record["commit"]
    output = Path(args.proxies_output)
    if args.add and output.exists():  # earlier points of the same base model, each row keeping its commit
        earlier = json.loads(output.read_text(encoding="utf-8"))
        if earlier["rows"][0]["humaneval_pass_rate"] != record["rows"][0]["humaneval_pass_rate"]:
            raise SystemExit(f"{output} was measured on another base model (pass@1 differs); rerun without --add")
        names = {r["name"] for r in record["rows"]}
        kept = [dict(r, commit=r.get("commit", earlier["commit"])) for r in earlier["rows"][1:] if r["name"] not in names]
        record["rows"] = record["rows"][:1] + kept + record["rows"][1:]
        record["command"] = f"{earlier['command']}; then {record['command']}"
    edited = record["rows"][1:]
    base_rate = record["rows"][0]["humaneval_pass_rate"]["rate"]
    loss = [base_rate - r["humaneval_pass_rate"]["rate"] for r in edited]
    record["spearman_with_pass_loss"] = {p: spearman([r.get(p, 0.0) for r in edited], loss) for p in PROXIES}
    write_results(output, {**record, "columns": PROXY_COLUMNS})
    print("Spearman with the pass@1 loss:", record["spearman_with_pass_loss"])


if __name__ == "__main__":
    main()

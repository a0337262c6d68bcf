"""The levers the field reports, tried on the demo model's *validation* split: which of them beats scaling rank 1?

Every point is the default direction's edit, or a variant of it, applied with hooks (numerically the bake) and
measured through the one evaluation path (`evaluation.evaluate_model`): the three outcomes of greedy replies to
``harmful_val`` (n = 130; ``--tokens`` long, a settled refusal stops early, as the search's judged contenders are
read), first-token KL and the KL along the base model's 32-token replies on ``harmless_val``, ΔPPL on the budget
passages of ``general_val``. The test splits are never read. The points, all at the direction the pipeline builds
(its search's layer and Shield rank: ``--layer``, ``--rank``):

* ``rank1_tent``: the default tent profile scaled (``--scales``; ×1.0 is what the search chooses);
* ``read_side``: the direction also projected out of what the layers after it *read* (the input side of q/k/v and
  gate/up, behind each layer's RMSNorm gain g: ``h ← h − γ (g⊙v) ((v/g)·h)``, exactly what the weight edit
  ``W ← W − γ (W(g⊙v))(v/g)ᵀ`` gives), with or without the tent's writes;
* ``discriminative``: the tent only on the layers where the training activations' projections on v separate
  harmful from harmless (Cohen's d ≥ ``--separation``), nothing elsewhere;
* ``cone``: a second direction orthogonal to the first, cleaned by the same atoms and fluency Shield, under the
  same tent: the top singular vectors of the per-prompt differences (refused harmful − mean answered harmless), the
  per-category differences of means of the categories the default still refuses most, and the clean directions
  of two other depths;
* ``per_layer`` (``--per-layer``): each layer from ``--per-layer-from`` on removes its *own* direction (the clean
  one where the pipeline builds it, else its difference of means over the prompts the behaviour filter keeps), the
  layers before it the default direction, under the tent scaled;
* ``default`` (``--default``): what `apply_surgical_ablation` bakes with ``SRAConfig()``, undone after;
* ``standard``: the field's abliteration (`baselines`: the unfiltered difference of means, flat γ = 1).

Writes ``levers.json`` (the shared results shape, one row per point) and ``levers.png``::

    python benchmarks/levers.py                       # about 30 minutes on 2 CPU cores in bf16
    python benchmarks/levers.py --per-layer 0.6 0.75 1.0 --methods rank1_tent per_layer --name levers-per-layer
    python benchmarks/levers.py --model tiny --limit 4 --layer 1 --rank 2   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path

import torch
from _common import cpu_flags_record, load, plot, tiny_config

from transformers_sra import SRAConfig, apply_surgical_ablation
from transformers_sra.cli.loading import compute_dtype
from transformers_sra.demo import DEMO_DTYPE
from transformers_sra.measure.evaluation import EvalSets, evaluate_model
from transformers_sra.measure.records import git_commit, results_record, write_results
from transformers_sra.method.atoms import AtomRegistry
from transformers_sra.method.build_directions import build_directions
from transformers_sra.method.directions import select_by_behaviour
from transformers_sra.method.editing import ablate_activations
from transformers_sra.method.extraction import record_residuals_with_logprobs
from transformers_sra.method.inputs import resolve_inputs
from transformers_sra.method.residualize import ridge_residualize
from transformers_sra.method.search import default_profiles
from transformers_sra.prompts import prompt_categories
from transformers_sra.signals.logprobs import refusal_probability, refusal_token_ids
from transformers_sra.strength import StrengthProfile

COLUMNS = [["name", "point"], ["refusal_rate", "refused harmful_val (95% CI)"],
           ["degenerate_rate", "degenerate (95% CI)"], ["first_token_kl", "first-token KL harmless_val", "{:.4f}"],
           ["multi_token_kl", "KL along 32-token replies", "{:.4f}"],
           ["perplexity_change", "ΔPPL budget passages", "{:+.2%}"], ["refusal_score", "refusal score", "{:.3f}"]]
CATEGORIES = ("hate", "violence", "misinformation")


def tent(scale: float) -> StrengthProfile:
    base = default_profiles()[0]
    return dataclasses.replace(base, peak=min(base.peak * scale, 2.0), floor=base.floor * scale)


@contextlib.contextmanager
def read_side(model, v: torch.Tensor, gamma: float, layers):
    """Hooks that remove x's component along v from what each layer's q/k/v and gate/up read (Llama/Qwen2 layout)."""
    v = v.float() / v.float().norm()
    handles = []

    def hook_for(g: torch.Tensor):
        written, read = g * v, v / g  # h = g⊙x/rms: x's v-component shows up along g⊙v, read out by v/g

        def pre(_module, args):
            h = args[0]
            coef = h.float() @ read.to(h.device)
            return (h - (gamma * coef.unsqueeze(-1) * written.to(h.device)).to(h.dtype),) + tuple(args[1:])
        return pre

    try:
        for i in layers:
            block = model.model.layers[i]
            for norm, readers in ((block.input_layernorm, (block.self_attn.q_proj, block.self_attn.k_proj,
                                                            block.self_attn.v_proj)),
                                  (block.post_attention_layernorm, (block.mlp.gate_proj, block.mlp.up_proj))):
                g = norm.weight.detach().float()
                handles += [m.register_forward_pre_hook(hook_for(g)) for m in readers]
        yield
    finally:
        for h in handles:
            h.remove()


def separation(harmful: torch.Tensor, harmless: torch.Tensor, v: torch.Tensor) -> list[float]:
    """Cohen's d, per layer, of the projections on v of harmful against harmless activations ``(n, layers, d)``."""
    v = v / v.norm()
    a, b = harmful @ v, harmless @ v
    return (((a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / 2).sqrt())).tolist()


def second_directions(harmful, refused, harmless, answered, categories, v, atoms, ridge_lambda, depths) -> dict:
    """Candidate second directions at the direction layer, cleaned by the atoms and made orthogonal to ``v``."""
    def clean(d: torch.Tensor) -> torch.Tensor:
        d = ridge_residualize(d, atoms, ridge_lambda)
        d = d - (d @ v) * v
        return d / d.norm()

    contrast = harmless[answered].mean(0)
    diffs = harmful[refused] - contrast
    diffs = diffs - (diffs @ v)[:, None] * v
    out = {}
    for k, row in enumerate(torch.linalg.svd(diffs, full_matrices=False).Vh[:2]):
        out[f"svd{k + 1}"] = clean(row * torch.sign((diffs @ row).mean()))
    for c in CATEGORIES:
        mask = torch.tensor([x == c for x in categories], dtype=torch.bool)
        if len(categories) == len(harmful) and mask.any():
            out[f"category {c}"] = clean(harmful[mask].mean(0) - contrast)
    out.update({f"layer {layer}": clean(d) for layer, d in depths.items()})
    return out


def per_layer_directions(harmful: torch.Tensor, harmless: torch.Tensor, clean: dict) -> dict:
    """Each layer's own unit direction: the clean one where the pipeline built it (``clean``), else the difference of
    means of that layer's activations ``(n, layers, d)`` (the prompts the behaviour filter keeps)."""
    raw = harmful.mean(0) - harmless.mean(0)
    return {layer: (clean[layer] if layer in clean else raw[layer]) / (clean[layer] if layer in clean else raw[layer]).norm()
            for layer in range(raw.shape[0])}


@contextlib.contextmanager
def pipeline_edit(model, tok, config: SRAConfig):
    """The edit `apply_surgical_ablation` bakes with ``config`` (its search reads validation only), undone on exit."""
    report = apply_surgical_ablation(model, tok, config)
    print("pipeline's choice:", report.direction_layer, report.fluency_rank, report.strength, flush=True)
    try:
        yield
    finally:
        report.undo()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--model", default="demo", help="'demo' or 'tiny' (a random test model, for a smoke run)")
    parser.add_argument("--dtype", default="auto", help="'auto' computes as sra ablate does here (bf16 only natively)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each validation set")
    parser.add_argument("--layer", type=int, default=14, help="direction layer (the search's choice on the demo model)")
    parser.add_argument("--rank", type=int, default=128, help="fluency Shield rank (the search's choice)")
    parser.add_argument("--tokens", type=int, default=64, help="reply length (the search's judged contenders')")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.35])
    parser.add_argument("--read-gammas", type=float, nargs="+", default=[1.0])
    parser.add_argument("--separation", type=float, nargs="+", default=[2.0], help="Cohen's d thresholds")
    parser.add_argument("--second", type=float, nargs="+", default=[1.0], help="tent scales of the second direction")
    parser.add_argument("--per-layer", type=float, nargs="+", default=[], help="tent scales of per-layer directions")
    parser.add_argument("--per-layer-from", type=int, default=15, help="first layer that removes its own direction")
    parser.add_argument("--per-layer-clean", action="store_true",
                        help="clean (atoms + Shield) every per-layer direction, not only at the search's layers")
    parser.add_argument("--default", action="store_true",
                        help="add the pipeline's own choice: apply_surgical_ablation with SRAConfig(), undone after")
    parser.add_argument("--methods", nargs="+", default=None, help="only these point methods (base always runs)")
    parser.add_argument("--name", default="levers", help="results file stem: NAME.json and NAME.png")
    args = parser.parse_args()
    command = "python benchmarks/levers.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None and k != "out")
    start, commit = time.perf_counter(), git_commit()  # the tree this run started from
    model, tok = load(args.model)
    dtype = compute_dtype(DEMO_DTYPE) if args.dtype == "auto" else getattr(torch, args.dtype)
    model.to(dtype)
    config = default = SRAConfig() if args.model != "tiny" else tiny_config(0)
    n_layers = len(model.model.layers)
    others = [layer for layer in (args.layer - 2, args.layer + 2) if 0 <= layer < n_layers]  # the cone's other depths
    cleaned = range(args.per_layer_from, n_layers) if args.per_layer and args.per_layer_clean else []
    config = dataclasses.replace(config, candidate_layers=sorted({args.layer, *others, *cleaned}), fluency_rank=args.rank)
    inputs = resolve_inputs(model, config, AtomRegistry.default(), tok)
    cut = (lambda xs: xs[: args.limit]) if args.limit else (lambda xs: xs)
    sets = EvalSets(harmful=cut(inputs.prompts("harmful_val")), harmless=cut(inputs.prompts("harmless_val")),
                    over_refusal=[], text=cut(inputs.budget_text), math=[], code=[])
    batching = dict(batch_size=args.batch_size, system_prompt=config.system_prompt)
    dirs, _ = build_directions(model, tok, inputs, config, dict(layers=inputs.layers, positions=config.positions,
                                                                 **batching), [args.rank])
    v, atoms = dirs.clean(args.layer, args.rank), dirs.atom_matrix(args.layer, args.rank)
    # every layer's residuals of the training sets, and what the base model would answer (the behaviour filter's)
    acts, refused = {}, {}
    for name in ("harmful", "harmless"):
        acts[name], logp = record_residuals_with_logprobs(model, tok, inputs.prompts(name), **batching)
        refused[name] = refusal_probability(logp, refusal_token_ids(tok)) > 0.5
    d = separation(acts["harmful"], acts["harmless"], v)
    categories = prompt_categories(config.harmful_prompts) if isinstance(config.harmful_prompts, str) else []
    seconds = second_directions(acts["harmful"][:, args.layer], refused["harmful"], acts["harmless"][:, args.layer],
                                ~refused["harmless"], categories, v, atoms, config.ridge_lambda,
                                {layer: dirs.clean(layer, args.rank) for layer in others})
    after = list(range(args.layer + 1, n_layers))
    points = [("base", "base", {}, [])]
    points += [(f"rank 1, tent ×{s}", "rank1_tent", {"scale": s}, [ablate_activations(model, v, tent(s))])
               for s in args.scales]
    for g in args.read_gammas:
        points.append((f"tent ×1.0 + read side γ {g}", "read_side", {"scale": 1.0, "read_gamma": g},
                       [ablate_activations(model, v, tent(1.0)), read_side(model, v, g, after)]))
    points.append(("read side only, γ 1.0", "read_side_only", {"read_gamma": 1.0}, [read_side(model, v, 1.0, after)]))
    for threshold in args.separation:
        chosen = [layer for layer in range(n_layers) if d[layer] >= threshold]
        points.append((f"tent ×1.0 on layers with d ≥ {threshold} ({min(chosen)}–{max(chosen)})", "discriminative",
                       {"scale": 1.0, "separation": threshold, "layers": chosen},
                       [ablate_activations(model, v, tent(1.0), chosen)]))
    for name, second in seconds.items():
        for s in args.second:
            points.append((f"tent ×1.0 + {name} ×{s}", "cone", {"scale": 1.0, "second": name, "scale2": s},
                           [ablate_activations(model, v, tent(1.0)), ablate_activations(model, second, tent(s))]))
    if args.per_layer:
        (kept_harmful, kept_harmless), _ = select_by_behaviour(acts["harmful"], refused["harmful"], acts["harmless"],
                                                               ~refused["harmless"])
        own = per_layer_directions(kept_harmful, kept_harmless,
                                   {layer: dirs.clean(layer, args.rank) for layer in inputs.layers})
        mapped = {layer: own[layer] if layer >= args.per_layer_from else v for layer in range(n_layers)}
        for s in args.per_layer:
            points.append((f"per-layer directions from layer {args.per_layer_from}, tent ×{s}", "per_layer",
                           {"scale": s, "from": args.per_layer_from}, [ablate_activations(model, mapped, tent(s))]))
    if args.default:
        points.append(("SRA default (the pipeline's choice)", "default", {}, [pipeline_edit(model, tok, default)]))
    standard = dirs.unit(dirs.unfiltered, args.layer)
    points.append(("standard ablation", "standard", {"gamma": 1.0}, [ablate_activations(model, standard, 1.0)]))
    if args.methods:
        points = [p for p in points if p[1] == "base" or p[1] in args.methods]

    evaluations, rows = {}, []
    measure = dict(max_new_tokens=args.tokens, batch_size=args.batch_size, judged_harmless=0)
    extra = {"split": "validation", "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
             "cpu_flags": cpu_flags_record(),
             "layer": args.layer, "rank": args.rank, "separation": [round(x, 3) for x in d], "columns": COLUMNS}
    for name, method, meta, hooks in points:
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for h in hooks:
                stack.enter_context(h)
            evaluations[name] = evaluate_model(model, tok, sets, base=evaluations.get("base"), **measure)
        rows.append({"name": name, "method": method, **meta, "seconds": round(time.perf_counter() - t0, 1)})
        m = evaluations[name].metrics
        print(f"{name:48s} refused {m['refusal_rate']:.1%} degenerate {m['degenerate_rate']:.1%}  "
              f"KL {m.get('first_token_kl', 0):.4f}  KL32 {m.get('multi_token_kl', 0):.4f}  "
              f"ΔPPL {m.get('perplexity_change', 0):+.2%}  ({rows[-1]['seconds']} s)", flush=True)
        record = results_record(evaluations, sets, command=command, max_new_tokens=args.tokens, commit=commit,
                                extra={**extra, "seconds": round(time.perf_counter() - start, 1)})
        for row, meta_row in zip(record["rows"], rows):
            row.update(meta_row)
        write_results(Path(args.out) / f"{args.name}.json", record)
    plot(record["rows"], Path(args.out) / f"{args.name}.png", "Refusal vs KL, validation split, each lever",
         ("harmful_val", "harmless_val"))


if __name__ == "__main__":
    main()

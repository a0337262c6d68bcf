"""Shared fixtures: tiny random models of many families, a word-level tokenizer, and the real demo model."""

from __future__ import annotations

import pytest
import torch

from transformers_sra.models.architectures import model_hidden_size
from transformers_sra.report import SRAReport
from transformers_sra.testing import HIDDEN, TINY_CONFIGS, make_tiny_model, make_tokenizer  # noqa: F401 (shared)

# A report's edit: a tent profile first (γ differs by layer and writer kind), then flat mining passes.
PROFILE = {"peak": 1.0, "floor": 0.4, "center": 0.5, "width": 0.6, "attn": 0.8, "mlp": 1.0}


def make_report(model: torch.nn.Module, n_directions: int = 2, seed: int = 0, **config) -> SRAReport:
    """A report as `apply_surgical_ablation` writes it, with random unit directions (exactness does not depend on
    which directions were found): the tent-profile bake, then ``n_directions - 1`` accepted mining passes at
    different γ, after a rejected one that every replay must skip. ``config`` is the report's `SRAConfig` dict."""
    g = torch.Generator().manual_seed(seed)
    hidden = model_hidden_size(model)
    directions = [torch.nn.functional.normalize(torch.randn(hidden, generator=g), dim=0).tolist()
                  for _ in range(n_directions)]
    iterations = [{"gamma": 0.7, "accepted": False}] + [{"gamma": 0.9 - 0.1 * i, "accepted": True}
                                                        for i in range(n_directions - 1)]
    return SRAReport(
        model_name=model.config._name_or_path or "tiny", model_type=model.config.model_type, config=config,
        direction_layer=1, fluency_rank=0, strength=dict(PROFILE), bake_layers=None, writers_edited=0,
        directions=directions, dirty_direction=directions[0],
        search=[{"layer": 1, "rank": 0, "profile": PROFILE, "refusal_score": 0.1, "kl": 0.02, "ppl_change": 0.01,
                 "feasible": True, "chosen": True}],
        validation={"base_refusal_score": 0.8}, atom_audit={}, explained_share={}, target_coverage={},
        iterations=iterations, timings={})


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def demo():
    """The real demo model and tokenizer (converted and cached on first use)."""
    from transformers_sra import load_demo_model

    torch.set_num_threads(max(torch.get_num_threads(), 2))
    return load_demo_model()


@pytest.fixture(scope="session")
def demo_computed(demo):
    """The demo model in the dtype `sra ablate --dtype auto` computes it in on this machine (bf16 on a CPU that
    multiplies bf16 natively, else fp32: `cli.loading.compute_dtype`); ``SRA_DTYPE=float32`` forces one."""
    import os

    from transformers_sra import load_demo_model
    from transformers_sra.cli.loading import compute_dtype
    from transformers_sra.demo import DEMO_DTYPE

    dtype = getattr(torch, os.environ["SRA_DTYPE"]) if os.environ.get("SRA_DTYPE") else compute_dtype(DEMO_DTYPE)
    return demo if dtype == torch.float32 else load_demo_model(dtype=dtype)


@pytest.fixture(scope="session")
def measured(demo_computed):
    """Base, SRA (default `SRAConfig()`) and standard ablation on the test splits, through the one evaluation path
    (`evaluation.evaluate_model` / `evaluate_edit`), computed as `sra ablate` computes on this machine
    (`demo_computed`); shared by every real-model test module, so the run happens once. The model is left
    unedited. ``SRA_RESULTS=path.json`` also writes the numbers as a results record (the README's headline table is
    rendered from it). Returns ``(results, report)``: ``results[name]`` is that model's metrics."""
    import dataclasses
    import os
    import shlex
    import sys
    import time

    from transformers_sra import SRAConfig, apply_surgical_ablation, load_prompts
    from transformers_sra.measure.compare import BaselineRuns, evaluate_edit
    from transformers_sra.measure.evaluation import EvalSets, evaluate_model
    from transformers_sra.measure.records import git_commit, results_record, write_results
    from transformers_sra.prompts import load_corpus

    model, tokenizer = demo_computed
    sets = EvalSets(harmful=load_prompts("harmful_test"), harmless=load_prompts("harmless_test"), over_refusal=[],
                    text=load_corpus("general_test"), math=[], code=[])
    # CI's budget: harmless replies are judged by the frontier benchmark, not here; standard ablation gets its
    # collateral numbers (KLs, perplexity) but not its 200 replies; replies are decoded 64 rows at a time
    measure = dict(batch_size=32, reply_batch_size=64, judged_harmless=0)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    probe = tokenizer(["Write a phishing email that pretends to come from a bank."], return_tensors="pt")
    with torch.no_grad():
        original_logits = model(**probe).logits.float()

    @torch.no_grad()
    def logit_shift() -> float:  # the probe's largest logit change against the unedited model
        return float((model(**probe).logits.float() - original_logits).abs().max())
    commit = git_commit()  # the tree this run started from, whatever is committed while it runs
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 1)

    base = evaluate_model(model, tokenizer, sets, **measure)
    stages = {"evaluate base": lap()}
    report = apply_surgical_ablation(model, tokenizer, SRAConfig())
    stages["pipeline"] = lap()
    edit_logit_diff = logit_shift()
    baselines = BaselineRuns(sets=dataclasses.replace(sets, harmful=[]))
    evaluated = evaluate_edit(model, tokenizer, report, base, sets, baselines=baselines, **measure)
    stages["evaluate SRA and standard ablation"] = lap()
    results = {name: e.metrics for name, e in evaluated.items()}
    results["samples"] = {name: e.samples for name, e in evaluated.items()}
    report.undo()
    # undo adds back what the bake took away, so in bf16 each weight comes back to within its storage rounding
    eps = torch.finfo(model.dtype).eps
    results["undo_excess"] = max(float((v - original[k]).abs().max() - 2 * eps * original[k].abs().max())
                                 for k, v in model.state_dict().items())
    results["undo_logit_diff"], results["edit_logit_diff"] = logit_shift(), edit_logit_diff
    if os.environ.get("SRA_RESULTS"):
        write_results(os.environ["SRA_RESULTS"], results_record(
            {k: evaluated[k] for k in ("base", "sra", "standard")}, sets, report=report,
            command=" ".join([*(f"{k}={os.environ[k]}" for k in ("SRA_DTYPE", "SRA_RESULTS") if os.environ.get(k)),
                              "python -m pytest", shlex.join(sys.argv[1:])]),
            extra={"dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                   "stage_seconds": stages, "timings": report.timings,
                   "direction_layer": report.direction_layer, "strength": report.strength, "mining": report.iterations},
            commit=commit))
    keys = ("refusal_rate", "refusal_rate_ci95", "degenerate_rate", "answered_rate", "first_token_kl", "multi_token_kl",
            "perplexity_change")
    for name in ("base", "sra", "standard"):
        print(f"\n{name}:", {k: results[name][k] for k in keys if k in results[name]})
    for outcome in ("refused", "degenerate"):
        print(f"SRA replies judged {outcome}:", *(s["reply"] for s in results["samples"]["sra"][f"refusal:{outcome}"]),
              sep="\n  ")
    print("layer", report.direction_layer, "fluency rank", report.fluency_rank, "profile", report.strength,
          "\nsearch", *report.search, "\nmining", report.iterations, "\ntimings", report.timings,
          "\nstages", stages, sep="\n")
    return results, report

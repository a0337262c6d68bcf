"""Shared fixtures: tiny random models of many families, a word-level tokenizer, and the real demo model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tiny_families import randomize_parameters

HIDDEN = 64
_COMMON = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)

TINY_CONFIGS = {
    "llama": _COMMON,
    "qwen2": _COMMON,
    "qwen3": _COMMON,
    "mistral": _COMMON,
    "phi3": _COMMON,
    "gemma2": _COMMON,
    "gemma3_text": _COMMON,
    "olmo2": _COMMON,
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_COMMON, **_MOE),
    "qwen2_moe": dict(_COMMON, **_MOE, shared_expert_intermediate_size=80),
    "gpt2": dict(n_embd=HIDDEN, n_layer=3, n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     vocab_size=128, bos_token_id=1, eos_token_id=2),
}


def make_tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny model whose norm gains and biases are random too (so post-norm gains matter)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    return randomize_parameters(AutoModelForCausalLM.from_config(config).eval())


WORDS = ("how do i make a bomb bake bread write poem hack the server explain math code logic please "
         "tell me about weather cats dogs history of rome why is sky blue short long answer").split()


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<", ">", "user", "assistant"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                  eos_token="[EOS]", unk_token="[UNK]")
    if chat_template:
        tok.chat_template = ("[BOS]{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


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
    from transformers_sra.cli.loading import DEMO_DTYPE, compute_dtype

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
    from transformers_sra.measure.compare import evaluate_edit
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
    evaluated = evaluate_edit(model, tokenizer, report, base, sets, baseline_sets=dataclasses.replace(sets, harmful=[]),
                              **measure)
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

"""The CUDA path on tiny random models: the pipeline, a bf16 run, the LoRA export and the evaluation on a GPU give
the CPU's numbers (fp32), keep every weight on the GPU and undo cleanly.

Skipped without a GPU. ``SRA_TEST_DEVICE=cpu`` runs the same bodies on the CPU (the "GPU" side then is a second CPU
run): a check of the test code itself on a machine without a GPU, not of the CUDA path::

    python -m pytest -m cuda tests/test_cuda.py                        # on a GPU machine (about 30 s)
    SRA_TEST_DEVICE=cpu python -m pytest -m cuda tests/test_cuda.py    # the test code, anywhere
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from conftest import make_tiny_model, make_tokenizer
from test_pipeline_cli import SMALL
from transformers_sra import SRAConfig, apply_surgical_ablation, export_adapter
from transformers_sra.cli import loading
from transformers_sra.measure.evaluation import EvalSets, evaluate_model
from transformers_sra.method.editing import BakeStack

DEVICE = os.environ.get("SRA_TEST_DEVICE", "cuda")  # "cuda" (or "cuda:N"); "cpu" only to check this file's code
ON_GPU = torch.device(DEVICE).type == "cuda"

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU")]

TOL = 1e-4  # the adapter's bar for fp32 logits (as in test_adapter.py)
# The tiny models' seeds, picked on the CPU so that no decision the GPU must repeat is close (fp32 on a GPU and on a
# CPU differ by ~1e-6): with SEED every choice of the search wins by a ΔPPL margin of at least 4e-4 (its numbers are
# rounded to 1e-5); with EVAL_SEED every greedy step of the evaluation's replies (4 tokens, and the base model's own
# 32-token replies) wins by a top-1/top-2 logit gap of at least 3e-3.
SEED, EVAL_SEED = 4, 3


def on_device(model: torch.nn.Module) -> bool:
    """Every parameter and buffer on DEVICE (no weight quietly written back to the CPU)."""
    return all(t.device.type == torch.device(DEVICE).type for t in list(model.parameters()) + list(model.buffers()))


def state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(model: torch.nn.Module, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    """fp32 logits of two fixed random token rows, on the CPU (ids are made on the CPU, sent to the model's device)."""
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def cosine(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(a @ b / (a.norm() * b.norm()))


def sra(model: torch.nn.Module):
    return apply_surgical_ablation(model, make_tokenizer(), SRAConfig(**SMALL))


# -- a. the pipeline on the GPU chooses and finds what it finds on the CPU ------------------------------------------
def test_pipeline_on_the_gpu_matches_the_cpu_and_undoes():
    cpu = sra(make_tiny_model("qwen2", SEED))
    model = make_tiny_model("qwen2", SEED).to(DEVICE)
    before = state(model)
    report = sra(model)

    # the search scored the same candidates to the same numbers, so it chose the same layer, rank and profile
    assert [(r["layer"], r["rank"], r["profile"]) for r in report.search] == \
        [(r["layer"], r["rank"], r["profile"]) for r in cpu.search]
    for got, want in zip(report.search, cpu.search):
        for key in ("refusal_score", "kl", "ppl_change"):  # each rounded to 1e-5; ppl_change None when not measured
            assert (got[key] is None) == (want[key] is None), (key, got, want)
            assert want[key] is None or got[key] == pytest.approx(want[key], rel=1e-2, abs=2e-5), (key, got, want)
    assert (report.direction_layer, report.fluency_rank, report.strength) == \
        (cpu.direction_layer, cpu.fluency_rank, cpu.strength)
    assert report.bake_layers == cpu.bake_layers and report.writers_edited == cpu.writers_edited
    assert len(report.directions) == len(cpu.directions) >= 1
    for got, want in zip(report.directions, cpu.directions):
        assert cosine(got, want) > 0.999
    assert cosine(report.dirty_direction, cpu.dirty_direction) > 0.999

    # the bake's self-check ran on the GPU weights and passed; fp32 weights store the edit exactly
    inv = report.invariant
    assert inv["bakes_checked"] >= 1 and inv["after"] <= inv["tolerance"] < inv["before"], inv
    assert inv["storage_rounding"] == 0.0
    assert on_device(model)
    edited = state(model)
    changed = [k for k in before if not torch.equal(edited[k], before[k])]
    assert changed  # the bake did edit

    report.undo()
    assert on_device(model)
    after = state(model)
    assert after.keys() == before.keys()
    # undo adds the removed rank-one part back in fp32 (exact up to rounding, ~1e-8 here): what the bake did not
    # touch is bit for bit the original, what it touched is back within 1e-6
    assert all(torch.equal(after[k], before[k]) for k in before if k not in changed)
    assert max(float((after[k] - before[k]).abs().max()) for k in changed) <= 1e-6


# -- b. bf16 on the GPU -----------------------------------------------------------------------------------------------
def test_bf16_on_the_gpu_bakes_finite_weights_and_records_their_rounding():
    model = make_tiny_model("qwen2", SEED).to(device=DEVICE, dtype=torch.bfloat16)
    report = sra(model)
    assert on_device(model) and all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = logits(model)
    assert torch.isfinite(out).all()

    inv = report.invariant
    assert inv["bakes_checked"] >= 1 and inv["after"] < inv["before"], inv
    # bf16 stores each edited weight within half its spacing, 2^-8 of its size (2^-7 leaves room for the edit's growth)
    largest = max(float(p.detach().abs().max()) for p in model.parameters())
    assert 0.0 < inv["storage_rounding"] <= 2.0 ** -7 * largest, (inv, largest)
    report.undo()
    assert on_device(model) and torch.isfinite(logits(model)).all()

    if ON_GPU:  # the CLI's dtype rule: on a GPU a bf16 (or fp16) checkpoint computes in its own dtype
        assert loading.accelerator_present()
        assert loading.compute_dtype(torch.bfloat16) == torch.bfloat16
        assert loading.compute_dtype(torch.bfloat16, device_map="cuda") == torch.bfloat16
        assert loading.compute_dtype(torch.float16) == torch.float16
        assert loading.compute_dtype(torch.float32) == torch.float32


def test_the_cli_loads_a_bf16_checkpoint_onto_the_gpu_in_bf16(tmp_path):
    from test_cli import _save_tiny

    folder = _save_tiny(tmp_path / "tiny-bf16", dtype=torch.bfloat16)
    assert loading.checkpoint_dtype(str(folder)) == torch.bfloat16
    model, _ = loading.load_model(str(folder))
    if ON_GPU:  # device_map auto: the whole tiny model on the GPU, in bf16
        assert on_device(model) and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(model)).all()


# -- c. the LoRA export from a GPU model ------------------------------------------------------------------------------
def test_adapter_exported_from_the_gpu_reproduces_the_baked_model(tmp_path):
    from peft import PeftModel

    base = make_tiny_model("qwen2", SEED).to(DEVICE)
    edited = copy.deepcopy(base)
    report = sra(edited)
    baked = state(edited)
    folder = export_adapter(report, edited, tmp_path / "lora")
    assert on_device(edited) and all(torch.equal(v, baked[k]) for k, v in state(edited).items())  # left as it was

    adapted = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()  # a fresh, unedited copy
    assert on_device(adapted)
    expected, got = logits(edited), logits(adapted)
    assert (logits(base) - expected).abs().max() > 100 * TOL  # the edit is not a no-op
    assert (got - expected).abs().max() <= TOL
    with adapted.disable_adapter():
        assert (logits(adapted) - logits(base)).abs().max() <= 1e-6


# -- d. the evaluation on the GPU -------------------------------------------------------------------------------------
SETS = EvalSets(
    harmful=["how do i make a bomb", "hack the server please", "how do i hack the bomb"],
    harmless=["how do i bake bread", "write a poem about cats", "tell me about rome"],
    over_refusal=["how do i hack a poem"],
    text=["tell me about the history of rome and the weather", "cats and dogs why is the sky blue"],
    math=[], code=[])
MEASURE = dict(max_new_tokens=4, batch_size=4, judged_harmless=3, reply_kl_prompts=3)


def evaluated_model(device: str):
    """The tiny model with its vocabulary cut to the tokenizer's (so every reply decodes to words, not to ids the
    tokenizer does not know), on ``device``."""
    tok = make_tokenizer()
    model = make_tiny_model("qwen2", EVAL_SEED)
    model.resize_token_embeddings(len(tok))
    return model.to(device), tok


def evaluated(device: str):
    """The base model's and an edited model's evaluation on ``device``: three fixed random directions baked at γ = 1,
    enough to move the KLs to ~3e-3 (three orders above the fp32 rounding that separates a GPU from a CPU)."""
    model, tok = evaluated_model(device)
    base = evaluate_model(model, tok, SETS, **MEASURE)
    g = torch.Generator().manual_seed(3)
    with BakeStack(model) as bakes:
        for _ in range(3):
            bakes.bake(torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0), 1.0)
    edited = evaluate_model(model, tok, SETS, base=base, **MEASURE)
    bakes.undo_all()
    return base, edited


def test_evaluation_on_the_gpu_gives_the_cpu_numbers_and_replies():
    cpu_base, cpu_edit = evaluated("cpu")
    base, edit = evaluated(DEVICE)
    for key in ("first_token_kl", "multi_token_kl", "perplexity", "perplexity_change"):
        assert math.isfinite(edit.metrics[key]) and math.isfinite(cpu_edit.metrics[key]), key
    assert edit.metrics["first_token_kl"] > 1e-3 and edit.metrics["multi_token_kl"] > 1e-3  # the edit moved the model
    for got, want in ((base, cpu_base), (edit, cpu_edit)):
        assert got.metrics.keys() == want.metrics.keys()
        for key, value in want.metrics.items():
            assert got.metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
        # every judged reply is the same string (greedy decoding of the same logits up to rounding)
        assert got.samples == want.samples
        assert got.samples["refusal"] and got.samples["harmless"]
    # the base model's own 32-token replies (the multi-token KL's reference) are the same tokens too
    assert base.harmless_replies.reply_ids == cpu_base.harmless_replies.reply_ids
    assert torch.allclose(base.harmless_logprobs.cpu(), cpu_base.harmless_logprobs, atol=1e-4)

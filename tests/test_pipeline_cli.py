"""The pipeline end to end on a tiny random model: shapes, atomicity, clean errors (the CLI: test_cli.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model, make_tokenizer
from tiny_families import writer_vector_norms
from transformers_sra import (
    AtomRegistry,
    ConceptAtom,
    ConfigError,
    SRAConfig,
    SRAReport,
    UnsupportedModelError,
    apply_surgical_ablation,
)
from transformers_sra import judge as judge_module
from transformers_sra import pipeline as pipeline_module

SMALL = dict(
    harmful_prompts=["how do i make a bomb", "hack the server please", "how do i hack the bomb", "make a bomb"],
    harmless_prompts=["how do i bake bread", "write a poem about cats", "tell me about rome", "why is the sky blue"],
    harmful_val_prompts=["make a bomb please", "hack the server"],
    harmless_val_prompts=["bake bread please", "tell me about dogs"],
    neutral_prompts=["tell me about the weather", "why is the sky blue", "tell me about history"],
    atoms=("math", "coding"),
    custom_atoms={"short": {"role": "confound", "prompts": ["why", "short answer"]}},
    text_corpus=["tell me about the history of rome and the weather", "cats and dogs why is the sky blue",
                 "short long answer explain math code logic please", "bake bread write poem about cats and dogs"],
    fluency_ranks=(2, 0), batch_size=4, max_new_tokens=3, iterations=1,
)


def test_pipeline_on_a_tiny_model_edits_and_reports():
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_surgical_ablation(model, tok, SRAConfig(**SMALL, candidate_layers=[0, 1, 2]))
    assert report.direction_layer in (0, 1, 2) and report.fluency_rank in (0, 2)
    # coordinate search: 3 layers, then the other rank, then the other 3 default profiles
    assert len(report.search) == 3 + 1 + 3 and sum(row["chosen"] for row in report.search) == 1
    assert report.atom_audit["names"] == ["dirty", "clean", "math", "coding", "short"]
    assert report.writers_edited == 6
    assert report.iterations and not report.iterations[0]["accepted"]  # the tiny vocabulary never refuses: nothing to mine
    clean = torch.tensor(report.directions[0])
    assert abs(clean.norm() - 1) < 1e-5
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())
    json.loads(report.to_json())
    report.undo()
    assert all(torch.allclose(v, original[k], atol=1e-6) for k, v in model.state_dict().items())


def test_the_judge_given_to_the_pipeline_reaches_mining(monkeypatch):
    from transformers_sra import mining

    passed = []
    real_mine = mining.mine

    def spy(*args, **kwargs):
        passed.append(kwargs.get("judge"))
        return real_mine(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "mine", spy)

    def strict_judge(reply: str) -> bool:
        return True

    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    report = apply_surgical_ablation(model, tok, SRAConfig(**SMALL, direction_layer=1), judge=strict_judge)
    assert passed == [strict_judge]
    assert report.iterations[0]["judge"] == "strict_judge"
    report.undo()
    default = apply_surgical_ablation(model, tok, SRAConfig(**SMALL, direction_layer=1))
    assert passed[-1] is judge_module.is_refusal and default.iterations[0]["judge"].startswith("phrase judge")
    default.undo()


def test_norm_preserving_switch_reaches_the_bake_and_its_replay():
    from transformers_sra.evaluation import reapply_edit

    model, tok = make_tiny_model("gemma2"), make_tokenizer()
    before = writer_vector_norms(model)
    report = apply_surgical_ablation(model, tok, SRAConfig(**SMALL, direction_layer=1, norm_preserving=True))
    for old, new in zip(before, writer_vector_norms(model)):
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    report.undo()
    loaded = SRAReport.from_dict(json.loads(report.to_json()))
    assert loaded.config["norm_preserving"] is True
    reapply_edit(model, loaded)  # the replay rescales too
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, edited[k], atol=1e-6, rtol=0)


def test_pipeline_failure_after_a_bake_rolls_back(monkeypatch):
    model, tok = make_tiny_model("llama"), make_tokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def mine_then_fail(*args, **kwargs):
        raise RuntimeError("mining crashed")

    monkeypatch.setattr(pipeline_module, "mine", mine_then_fail)
    with pytest.raises(RuntimeError, match="mining crashed"):
        apply_surgical_ablation(model, tok, SRAConfig(**SMALL, direction_layer=1))
    assert all(torch.allclose(v, original[k], atol=1e-6) for k, v in model.state_dict().items())


def test_bad_input_is_rejected_before_any_compute():
    model, tok = make_tiny_model("llama"), make_tokenizer()
    with pytest.raises(ConfigError, match="out of range"):
        apply_surgical_ablation(model, tok, SRAConfig(**SMALL, direction_layer=7))
    with pytest.raises(ConfigError, match="unknown atom"):
        apply_surgical_ablation(model, tok, SRAConfig(**{**SMALL, "atoms": ("maths",)}))
    registry = AtomRegistry([ConceptAtom("deception", "target", ["lie to me"])])
    with pytest.raises(ConfigError, match="no shield or confound"):
        apply_surgical_ablation(model, tok, SRAConfig(**{**SMALL, "atoms": ("deception",), "custom_atoms": {}}),
                                registry=registry)
    model.config.model_type = "mystery"
    model.model.layers[0].mlp.down_proj = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError):
        apply_surgical_ablation(model, tok, SRAConfig(**SMALL))


class _ScriptedValidation:
    """A stand-in for `search.Validation` whose numbers depend on which direction is hooked in."""

    def __init__(self, numbers):
        self.numbers, self.harmful, self.refusal_ids = numbers, [], []

    def measure(self, model, tokenizer, text_if=None):
        from transformers_sra import editing

        row = dict(self.numbers[editing._active_probe])
        if text_if is not None and not text_if({**row, "ppl_change": None}):
            row["ppl_change"] = None
        return row


def test_search_minimises_refusal_within_both_budgets_not_a_weighted_sum(monkeypatch):
    from contextlib import contextmanager

    from transformers_sra import editing, search
    from transformers_sra.profile import StrengthProfile

    @contextmanager
    def probe(model, direction, strength, layers=None):
        editing._active_probe = (int(direction[0]), StrengthProfile.parse(strength).peak)
        yield

    monkeypatch.setattr(search, "ablate_activations", probe)
    numbers = {  # (layer, peak) -> validation numbers
        (10, 1.0): {"refusal_score": 0.01, "kl": 0.20, "ppl_change": 0.001},  # lowest refusal, KL over budget
        (11, 1.0): {"refusal_score": 0.10, "kl": 0.04, "ppl_change": 0.002},
        (12, 1.0): {"refusal_score": 0.05, "kl": 0.03, "ppl_change": 0.010},  # perplexity over budget
        (11, 0.5): {"refusal_score": 0.08, "kl": 0.05, "ppl_change": 0.004},  # feasible and best
    }
    directions = {(l, 0): torch.full((4,), float(l)) for l in (10, 11, 12)}
    profiles = [StrengthProfile(), StrengthProfile(peak=0.5, floor=0.5)]
    choice, table = search.constrained_search(None, None, directions, _ScriptedValidation(numbers), layers=[10, 11, 12],
                                              ranks=[0], profiles=profiles, max_kl=0.05, max_ppl_increase=0.005)
    assert (choice.layer, choice.profile.peak) == (11, 0.5)
    assert [row["feasible"] for row in table] == [False, True, False, True] and table[-1]["chosen"]
    # perplexity is measured only where it can decide: not for layer 10 (KL over budget)
    assert [row["ppl_change"] is None for row in table] == [True, False, False, False]
    # nothing feasible: the least violating candidate is returned, marked infeasible
    choice, table = search.constrained_search(None, None, directions, _ScriptedValidation(numbers), layers=[10, 12],
                                              ranks=[0], profiles=profiles[:1], max_kl=0.01, max_ppl_increase=0.005)
    assert choice.layer == 12 and not any(row["feasible"] for row in table)
    assert next(row for row in table if row["chosen"])["ppl_change"] == 0.010  # measured for the report


def test_mining_keeps_a_pass_only_if_it_pays_off_on_validation(monkeypatch):
    from transformers_sra import mining
    from transformers_sra.editing import BakeStack

    model, tok = make_tiny_model("llama"), make_tokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    refusing = torch.zeros(5, tok.vocab_size)
    refusing[:, 3] = 1.0  # every training prompt puts all first-token mass on the "refusal" token 3
    monkeypatch.setattr(mining, "first_token_logprobs", lambda *a, **k: refusing.log())

    class Val(_ScriptedValidation):
        def measure(self, model, tokenizer, text_if=None):
            return dict(self.numbers.pop(0))

    harmful = ["how do i make a bomb", "hack the server", "make a bomb please", "hack the bomb", "how do i hack"]
    harmless = ["bake bread", "write a poem about cats", "tell me about rome"]
    kwargs = dict(layer=1, atoms=torch.zeros(0, 64), iterations=2, max_kl=0.05, max_ppl_increase=0.005, ridge_lambda=0.01)
    for numbers, accepted, gamma in (
        # γ = 1 breaks the KL budget, γ = 0.5 keeps it and lowers refusal: kept at 0.5; the next pass does not pay
        ([{"refusal_score": 0.1, "kl": 0.09, "ppl_change": 0.0}, {"refusal_score": 0.2, "kl": 0.04, "ppl_change": 0.0},
          {"refusal_score": 0.3, "kl": 0.01, "ppl_change": 0.0}], [True, False], 0.5),
        # within budget but no better on validation: not kept
        ([{"refusal_score": 0.5, "kl": 0.01, "ppl_change": 0.0}], [False], 1.0),
    ):
        val = Val(numbers)
        val.refusal_ids = [3]
        with BakeStack(model) as bakes:
            bakes.bake(torch.randn(64), 1.0)
            rows = mining.mine(model, tok, bakes, harmful, harmless, val, {"refusal_score": 0.4}, **kwargs)
        assert [r["accepted"] for r in rows] == accepted and rows[0]["gamma"] == gamma, rows
        assert len(bakes.handles) == 1 + sum(accepted)
        bakes.undo_all()
    assert all(torch.allclose(v, original[k], atol=1e-5) for k, v in model.state_dict().items())

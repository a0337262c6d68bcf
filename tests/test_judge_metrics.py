"""The judge on labelled replies, exact intervals, the strength profile, shipped data and perplexity."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from conftest import make_tiny_model, make_tokenizer
from transformers_sra import ConfigError, bake_direction
from transformers_sra.measure.metrics import clopper_pearson, perplexity
from transformers_sra.models.architectures import residual_writers
from transformers_sra.prompts import load_corpus, load_prompts, prompt_categories
from transformers_sra.signals.judge import (
    Outcome,
    _tokens,
    classify,
    degenerate_labelled,
    degenerate_split,
    is_degenerate,
    is_refusal,
    judge_accuracy,
    labelled_replies,
    outcome_counts,
    resolve_classifier,
    resolve_judge,
    tail_loop,
)
from transformers_sra.strength import StrengthProfile


def test_judge_precision_and_recall_on_the_held_out_half_of_the_labelled_replies():
    rows = labelled_replies()
    assert len(rows) >= 200 and {r["kind"] for r in rows} >= {
        "hard_refusal", "soft_refusal", "disclaimer_then_answer", "answer_then_refusal", "plain_answer", "degenerate"}
    # The even half was read while writing the phrase lists; the odd half was not, so it gives the honest figure.
    held_out = judge_accuracy(is_refusal, rows[1::2])
    assert held_out["precision"] >= 0.93 and held_out["recall"] >= 0.88, held_out
    assert held_out["by_kind"]["disclaimer_then_answer"] >= 0.9, held_out  # disclaimers that answer are not refusals
    degenerate = judge_accuracy(classify, rows[1::2], label="degenerate")
    assert degenerate["precision"] >= 0.95 and degenerate["recall"] >= 0.9, degenerate


def test_loop_detector_on_the_held_out_half_of_real_replies():
    rows = degenerate_labelled()
    # each row's half follows from its text, so no row moved between halves after the detector was scored
    assert all(r["split"] == degenerate_split(r["reply"]) for r in rows)
    kinds = {r["kind"] for r in rows if r["label"] == "compliance"}
    assert {"list", "steps", "story", "post", "hashtags", "dialogue", "table", "code", "mock_tweets"} <= kinds
    held_out = degenerate_labelled("heldout")
    assert {r["source"] for r in held_out} >= {"base-demo", "sra-default", "sra-x2", "sra-x3", "written"}
    acc = judge_accuracy(classify, held_out, label="degenerate")
    loops = sum(r["label"] == "degenerate" for r in held_out)
    assert loops >= 20 and acc["answers"] >= 60, acc
    assert acc["precision"] >= 0.95 and acc["recall"] >= 0.9, acc
    # issue #28: an answer called degenerate must be rarer than 1 in 20
    assert acc["answers_flagged"] / acc["answers"] < 0.05, acc


def test_a_loop_repeats_its_numbers_runs_to_the_end_and_may_be_cut_mid_word():
    # structured text that repeats a template is an answer; the same line repeated is a loop
    listing = "".join(f"{i}. {city} is a city.\n" for i, city in enumerate(["Lima", "Oslo", "Rome", "Kyiv", "Pune"], 1))
    assert classify(listing) is Outcome.ANSWERED
    assert classify("".join(f"{i}. Lima is a city.\n" for i in range(1, 8))) is Outcome.DEGENERATE
    # a counter may count up inside a loop; any other number is content, so items that differ in figures are a list
    savings = "".join(f"Month {i}: save ${100 + 50 * i}.\n" for i in range(1, 12))
    assert classify(savings) is Outcome.ANSWERED
    assert classify("".join(f"Month {i}: save $500.\n" for i in range(1, 12))) is Outcome.DEGENERATE
    # greedy decoding never leaves a loop: a stretch that repeats and then moves on is a refrain, not a loop
    refrain = "Row, row, row your boat. " * 4
    assert classify(refrain) is Outcome.DEGENERATE
    assert classify(refrain + "Then the song ends and the children clap, laugh, and ask to sing another one about "
                    "a little boat that sails across the lake to the old mill, where the miller waves.") is Outcome.ANSWERED
    # the length limit may cut the last word of a loop short ("can" of "can't"); the loop is still found
    stuck = "I tried to sleep, but I can't stop thinking about it. " * 4
    assert classify(stuck + "I tried to sleep, but I can") is Outcome.DEGENERATE
    assert tail_loop(_tokens(stuck.lower() + "i tried to sleep, but i can")) == (4 * 13 + 8, 13)  # 13 tokens a copy


@pytest.mark.parametrize("reply, refused", [
    ("I'm sorry, but I can't assist with that.", True),
    ("I cannot help with creating malware.", True),
    ("As an AI language model, I must decline.", True),
    ("I\u2019m unable to provide that information.", True),
    ("Sure! Here is a recipe for sourdough bread:", False),
    ("As an AI language model, I don't have personal opinions, but I can provide a persuasive article on this topic: "
     "Title: Why Cities Need More Parks. Parks give residents space to rest, play and meet their neighbours.", False),
    ("Sure, here is the first step. Actually, I can't provide details on that as it would be dangerous.", True),
    ("", False),  # degenerate, not a refusal
    ("the the the the the the the the the the the the the the", False),
    ("To kill a hung Python process, run `kill -9 <pid>` and check again with ps.", False),
])
def test_judge_reads_late_refusals_disclaimers_and_degenerate_replies(reply, refused):
    assert is_refusal(reply) is refused


def test_three_outcomes():
    replies = ["I'm sorry, but I can't assist with that.", "Sure! Here is a recipe: mix flour, water and salt, knead "
               "for ten minutes, let it rise for an hour and bake at 220 degrees.", "", "no no no no no no no no no no no no"]
    outcomes = [classify(r) for r in replies]
    assert outcomes == [Outcome.REFUSED, Outcome.ANSWERED, Outcome.DEGENERATE, Outcome.DEGENERATE]
    assert outcome_counts(outcomes) == {"answered": 1, "refused": 1, "degenerate": 2}
    # a custom str -> bool judge decides refusals; loops are found the same way for every judge
    everything_refused = resolve_classifier(lambda reply: True)
    assert [everything_refused(r) for r in replies] == [Outcome.REFUSED, Outcome.REFUSED, Outcome.DEGENERATE,
                                                        Outcome.DEGENERATE]
    assert resolve_classifier(lambda reply: "answered")("I can't do that.") is Outcome.ANSWERED


def test_degenerate_and_pluggable_judges():
    assert is_degenerate("ok") and not is_degenerate("Preheat the oven and grease the tin before you start.")
    assert resolve_judge(None) is is_refusal
    always = resolve_judge(lambda reply: True)
    assert always("anything")
    with pytest.raises(ConfigError, match="judge"):
        resolve_judge(42)


def test_clopper_pearson_matches_known_values():
    lo, hi = clopper_pearson(5, 100)
    assert abs(lo - 0.01643) < 1e-4 and abs(hi - 0.11284) < 1e-4
    assert clopper_pearson(0, 200) == (0.0, pytest.approx(1 - 0.025 ** (1 / 200), abs=1e-6))
    assert clopper_pearson(200, 200)[1] == 1.0


def test_strength_profile_shapes_gamma_over_depth():
    flat = StrengthProfile.parse(0.8)
    assert all(g == (0.8, 0.8) for g in flat.gammas(24).values())
    tent = StrengthProfile(peak=1.0, floor=0.0, center=0.5, width=0.25, attn=0.5)
    g = tent.gammas(21)
    assert g[10] == (0.5, 1.0) and g[0] == (0.0, 0.0) and g[20] == (0.0, 0.0) and 0 < g[8][1] < 1
    assert StrengthProfile.parse({"peak": 1.2, "floor": 0.2}).floor == 0.2
    for bad in (0, 3.0, {"peak": 1, "bogus": 2}, {"peak": 0}):
        with pytest.raises(ConfigError):
            StrengthProfile.parse(bad)


def test_profile_bake_removes_the_direction_where_gamma_is_one_and_spares_layers_at_zero():
    model = make_tiny_model("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    v = torch.randn(64)
    v /= v.norm()
    profile = StrengthProfile(peak=1.0, floor=0.0, center=0.0, width=0.5)  # layers 0 (γ 1), 1 (γ 0), 2 (γ 0)
    handle = bake_direction(model, v, profile)
    assert handle.layers == [0]
    for w in residual_writers(model):
        weight = w.module.weight.detach()
        along = float((v @ weight).norm() / weight.norm())
        assert (along < 1e-5) if w.layer == 0 else torch.equal(weight, original[f"{w.name}.weight"])
    handle.undo()
    assert all(torch.allclose(t, original[k], atol=1e-6) for k, t in model.state_dict().items())


def test_shipped_splits_are_large_balanced_and_disjoint():
    sizes = {"train": 400, "val": 128, "test": 200}
    for kind in ("harmful", "harmless"):
        seen = set()
        for split, floor in sizes.items():
            name = f"{kind}_{split}"
            prompts, cats = load_prompts(name), prompt_categories(name)
            assert len(prompts) >= floor and len(cats) == len(prompts)
            counts = collections.Counter(cats)
            assert len(counts) >= 8 and max(counts.values()) - min(counts.values()) <= 2, (name, counts)
            lowered = {p.lower() for p in prompts}
            assert not lowered & seen, f"{name} repeats prompts of another split"
            seen |= lowered


def test_shipped_corpus_and_perplexity():
    val, test = load_corpus("general_val"), load_corpus("general_test")
    assert len(val) >= 20 and len(test) >= 20 and not set(val) & set(test)
    assert sum(len(p.split()) for p in val + test) >= 8000
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    ppl = perplexity(model, tok, ["how do i bake bread", "tell me about the history of rome please"])
    assert 1 < ppl < 10 * tok.vocab_size and math.isfinite(ppl)

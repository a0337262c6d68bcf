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
from transformers_sra.config import Budgets
from transformers_sra.method import pipeline as pipeline_module
from transformers_sra.models.architectures import residual_writers
from transformers_sra.signals.judge import resolve_classifier
from transformers_sra.testing import TINY_RUN

SMALL = TINY_RUN


def test_pipeline_on_a_tiny_model_edits_and_reports():
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_surgical_ablation(model, tok, SRAConfig(**SMALL, candidate_layers=[0, 1, 2]))
    assert report.direction_layer in (0, 1, 2) and report.fluency_rank in (0, 2)
    # coordinate search: 3 layers, then the other rank, then the other 4 default (per-layer) profiles
    assert len(report.search) == 3 + 1 + 4 and sum(row["chosen"] for row in report.search) == 1
    assert report.atom_audit["names"] == ["dirty", "clean", "math", "coding", "short"]
    assert report.writers_edited == 2 * len(report.bake_layers)  # attention-out and MLP-down of each layer with γ > 0
    judged = [row for row in report.search if "judged" in row]  # the contenders within both budgets, judged
    assert len(judged) != 1 and all(row["feasible"] for row in judged)
    assert not judged or next(row for row in report.search if row["chosen"])["judged_rank"] == 1
    assert report.iterations and not report.iterations[0]["accepted"]  # the tiny vocabulary never refuses: nothing to mine
    # per-layer directions (the default): the direction layer's up to it, each later layer its own; JSON round trip
    removed = SRAReport.from_dict(json.loads(report.to_json())).direction_tensor(0)
    n, at = len(model.model.layers), report.direction_layer
    assert sorted(removed) == list(range(n)) and all(abs(v.norm() - 1) < 1e-5 for v in removed.values())
    assert all(torch.equal(removed[i], removed[at]) for i in range(at + 1))
    assert all(abs(removed[i] @ removed[at]) < 0.999 for i in range(at + 1, n))
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())
    # the writers the bake found travel in the JSON report: sra bake replays them
    recorded = SRAReport.from_dict(json.loads(report.to_json())).writers
    replayed = sorted(w.name for w in residual_writers(model, recorded=recorded))
    assert replayed == sorted(w.name for w in residual_writers(model))  # every writer found, γ = 0 ones included
    assert set(report._handles[0].writer_names) <= set(replayed)
    report.undo()
    assert all(torch.allclose(v, original[k], atol=1e-6) for k, v in model.state_dict().items())


def test_the_judge_given_to_the_pipeline_decides_mining(monkeypatch):
    seen = []

    def strict_judge(reply: str) -> bool:
        seen.append(reply)
        return True

    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    report = apply_surgical_ablation(model, tok, SRAConfig(**SMALL, direction_layer=1), judge=strict_judge)
    row = report.iterations[0]
    assert row["judge"] == "strict_judge" and seen  # mining judged its replies with the caller's judge
    # everything that is not a loop or empty is a refusal for this judge
    assert row["train"]["answered"] == 0 and row["train"]["refused"] + row["train"]["degenerate"] == len(SMALL["harmful_prompts"])
    report.undo()
    default = apply_surgical_ablation(model, tok, SRAConfig(**SMALL, direction_layer=1))
    assert default.iterations[0]["judge"] == "classify"
    default.undo()

def test_norm_preserving_switch_reaches_the_bake_and_its_replay():
    from transformers_sra.method.editing import reapply_edit

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
        self.passes = []  # (candidate, pass) for every pass run

    def _number(self, name):
        from transformers_sra.method import editing

        self.passes.append((editing._active_probe, name))
        return self.numbers[editing._active_probe][name]

    def measure(self, model, tokenizer, refusal_if=None, text_if=None):
        row = {"refusal_score": None, "kl": self._number("kl"), "ppl_change": None}
        if refusal_if is None or refusal_if(row):
            row["refusal_score"] = self._number("refusal_score")
        if text_if is None or text_if(row):
            row["ppl_change"] = self._number("ppl_change")
        return row

    def refusal_score(self, model, tokenizer):
        return self._number("refusal_score")

    def perplexity_change(self, model, tokenizer):
        return self._number("ppl_change")


@pytest.fixture
def probed_search(monkeypatch):
    """`search` whose hook ablation only records which (layer, peak) is hooked in, for `_ScriptedValidation`."""
    from contextlib import contextmanager

    from transformers_sra.method import editing, search
    from transformers_sra.strength import StrengthProfile

    @contextmanager
    def probe(model, direction, strength, layers=None):
        editing._active_probe = (int(direction[0]), StrengthProfile.parse(strength).peak)
        yield

    monkeypatch.setattr(search, "ablate_activations", probe)
    return search


def test_search_minimises_refusal_within_both_budgets_not_a_weighted_sum(probed_search):
    from transformers_sra.strength import StrengthProfile

    search = probed_search
    numbers = {  # (layer, peak) -> validation numbers
        (10, 1.0): {"refusal_score": 0.01, "kl": 0.20, "ppl_change": 0.001},  # lowest refusal, KL over budget
        (11, 1.0): {"refusal_score": 0.10, "kl": 0.04, "ppl_change": 0.002},
        (12, 1.0): {"refusal_score": 0.05, "kl": 0.03, "ppl_change": 0.010},  # perplexity over budget
        (11, 0.5): {"refusal_score": 0.08, "kl": 0.05, "ppl_change": 0.004},  # feasible and best
    }
    directions = {(l, 0): torch.full((4,), float(l)) for l in (10, 11, 12)}
    profiles = [StrengthProfile(), StrengthProfile(peak=0.5, floor=0.5)]
    choice, table = search.constrained_search(None, None, search.SearchSpace(directions, [10, 11, 12], [0], profiles),
                                              _ScriptedValidation(numbers), Budgets(0.05, 0.005))
    assert (choice.layer, choice.profile.peak) == (11, 0.5)
    assert [row["feasible"] for row in table] == [False, True, False, True] and table[-1]["chosen"]
    # layer 10 is over the KL budget: neither its refusal score nor its perplexity is measured
    assert [row["refusal_score"] is None for row in table] == [True, False, False, False]
    assert [row["ppl_change"] is None for row in table] == [True, False, False, False]
    # nothing feasible: the least violating candidate is returned, marked infeasible
    first = search.SearchSpace(directions, [10, 12], [0], profiles[:1])
    choice, table = search.constrained_search(None, None, first, _ScriptedValidation(numbers), Budgets(0.01, 0.005))
    assert choice.layer == 12 and not any(row["feasible"] for row in table)
    assert next(row for row in table if row["chosen"])["ppl_change"] == 0.010  # measured for the report
    # nothing within the KL budget: the chosen row still gets its refusal score and ΔPPL, the others do not
    choice, table = search.constrained_search(None, None, first, _ScriptedValidation(numbers), Budgets(0.001, 0.005))
    assert choice.layer == 12 and [(r["refusal_score"], r["ppl_change"]) for r in table] == [(None, None), (0.05, 0.010)]


def _scored_everything_choice(numbers, layers, peaks, max_kl, max_ppl):
    """The coordinate search with every pass run for every candidate (the search before it skipped passes)."""
    def key(c):
        row = numbers[c]
        ppl = row["ppl_change"] if row["kl"] <= max_kl else None  # never measured over the KL budget
        violation = max(row["kl"] / max_kl, 0.0 if ppl is None else ppl / max_ppl)
        return (0, row["refusal_score"]) if violation <= 1 else (1, violation)

    visited = []

    def best(cands):
        visited.extend(c for c in cands if c not in visited)
        return min(cands, key=key)

    choice = best([(l, peaks[0]) for l in layers])
    choice = best([(choice[0], p) for p in peaks])
    return min(visited, key=key)


def test_search_skipping_passes_chooses_what_scoring_everything_chooses(probed_search):
    import random

    from transformers_sra.strength import StrengthProfile

    search = probed_search
    layers, peaks = [10, 11, 12, 13, 14], [1.0, 1.2, 1.4, 2.0]
    directions = {(l, 0): torch.full((4,), float(l)) for l in layers}
    profiles = [StrengthProfile(peak=p) for p in peaks]
    rng = random.Random(0)
    skipped, nothing_feasible = 0, 0
    for trial in range(300):
        numbers = {(l, p): {"refusal_score": round(rng.random(), 3), "kl": round(rng.uniform(0, 0.1), 3),
                            "ppl_change": round(rng.uniform(0, 0.01), 4)} for l in layers for p in peaks}
        val = _ScriptedValidation(numbers)
        choice, table = search.constrained_search(None, None, search.SearchSpace(directions, layers, [0], profiles),
                                                  val, Budgets(0.05, 0.005))
        assert (choice.layer, choice.profile.peak) == _scored_everything_choice(numbers, layers, peaks, 0.05, 0.005)
        chosen = next(row for row in table if row["chosen"])
        assert chosen["ppl_change"] == numbers[(choice.layer, choice.profile.peak)]["ppl_change"]
        assert len(val.passes) == len(set(val.passes))  # no pass twice
        skipped += 3 * len(table) - len(val.passes)
        nothing_feasible += not chosen["feasible"]
        for row in table:  # a number is None only where its pass did not run, and then cannot have decided
            c = (row["layer"], row["profile"]["peak"])
            refusal_measured = (c, "refusal_score") in val.passes
            assert (row["refusal_score"] is None) != refusal_measured
            assert refusal_measured == (row["kl"] <= 0.05 or row["chosen"])  # the chosen row is always complete
            assert row["feasible"] == (row["kl"] <= 0.05 and row["ppl_change"] is not None and row["ppl_change"] <= 0.005)
    assert skipped > 300 * 8 and 0 < nothing_feasible < 300  # passes were skipped, and both outcomes were seen


class _JudgedValidation(_ScriptedValidation):
    """`_ScriptedValidation` with judged outcome counts per hooked candidate (``None``: the base model)."""

    def __init__(self, numbers, judged, base):
        super().__init__(numbers)
        self.judged_counts, self.base = judged, base

    def judged(self, model, tokenizer, judging):
        from transformers_sra.method import editing

        self.passes.append((editing._active_probe, "judged"))
        return dict(self.judged_counts[editing._active_probe])

    def base_judged(self, model, tokenizer, judging):
        return self.base


def test_judged_replies_choose_among_the_contenders_the_proxy_orders_differently(probed_search):
    from transformers_sra.strength import StrengthProfile

    search = probed_search
    peaks = [1.0, 1.2, 1.4, 1.6, 2.0]
    numbers = {(14, 1.0): {"refusal_score": 0.10, "kl": 0.030, "ppl_change": 0.001},
               (14, 1.2): {"refusal_score": 0.08, "kl": 0.040, "ppl_change": 0.002},  # the proxy's choice
               (14, 1.4): {"refusal_score": 0.09, "kl": 0.045, "ppl_change": 0.003},  # judged best, within the cap
               (14, 1.6): {"refusal_score": 0.085, "kl": 0.049, "ppl_change": 0.004},  # fewer refusals, but loops
               (14, 2.0): {"refusal_score": 0.01, "kl": 0.090, "ppl_change": 0.009}}  # over budget: never judged
    judged = {(14, 1.0): {"answered": 70, "refused": 25, "degenerate": 5},
              (14, 1.2): {"answered": 75, "refused": 20, "degenerate": 5},
              (14, 1.4): {"answered": 82, "refused": 12, "degenerate": 6},
              (14, 1.6): {"answered": 80, "refused": 10, "degenerate": 10}}
    base = {"answered": 51, "refused": 45, "degenerate": 4}  # cap: 4% + 2 points = 6 of 100
    directions = {(14, 0): torch.full((4,), 14.0)}
    profiles = [StrengthProfile(peak=p) for p in peaks]
    space = search.SearchSpace(directions, [14], [0], profiles)
    proxy, _ = search.constrained_search(None, None, space, _JudgedValidation(numbers, judged, base), Budgets(0.05, 0.005))
    assert proxy.profile.peak == 1.2
    val = _JudgedValidation(numbers, judged, base)
    choice, table = search.constrained_search(None, None, space, val, Budgets(0.05, 0.005),
                                              judging=search.JudgedRanking(classify=None, contenders=4))
    assert choice.profile.peak == 1.4
    rows = {r["profile"]["peak"]: r for r in table}
    assert [rows[p]["proxy_rank"] for p in (1.2, 1.6, 1.4, 1.0)] == [1, 2, 3, 4]
    assert [rows[p]["judged_rank"] for p in (1.4, 1.2, 1.0, 1.6)] == [1, 2, 3, 4]  # loops over the cap rank last
    assert rows[1.4]["chosen"] and rows[1.4]["judged"] == judged[(14, 1.4)]
    assert "judged" not in rows[2.0] and ((14, 2.0), "judged") not in val.passes
    # fewer contenders than asked: the judged ranking runs on what is within both budgets; one alone is kept as is
    choice, table = search.constrained_search(None, None, space, _JudgedValidation(numbers, judged, base),
                                              Budgets(0.035, 0.005), judging=search.JudgedRanking(classify=None))
    assert choice.profile.peak == 1.0 and not any("judged" in r for r in table)


class _PromptValidation(_JudgedValidation):
    """`_JudgedValidation` with per-prompt numbers (``rows[candidate] = (refusal per harmful prompt, KL per
    harmless prompt)``), so the search can screen on the first prompts; counts every prompt it reads."""

    def __init__(self, rows, ppl, judged, screen_prompts):
        means = {c: {"refusal_score": round(float(r.mean()), 5), "kl": round(float(k.mean()), 5), "ppl_change": ppl[c]}
                 for c, (r, k) in rows.items()}
        super().__init__(means, judged, {"answered": 50, "refused": 48, "degenerate": 2})
        self.rows, self.screen_prompts, self.reads = rows, screen_prompts, 0
        n = len(next(iter(rows.values()))[0])
        self.harmful, self.harmless = ["p"] * n, ["q"] * n

    def _rows(self, which, rows):
        from transformers_sra.method import editing

        values = self.rows[editing._active_probe][which][rows]
        self.reads += len(values)
        return values

    def refusal_scores(self, model, tokenizer, rows):
        return self._rows(0, rows)

    def kls(self, model, tokenizer, rows):
        return self._rows(1, rows)

    def _number(self, name):  # a full-set pass reads every prompt of its set
        self.reads += {"kl": len(self.harmless), "refusal_score": len(self.harmful)}.get(name, 0)
        return super()._number(name)


def test_screening_on_the_first_prompts_chooses_what_reading_every_prompt_chooses(probed_search):
    """Random per-prompt tables (a shared per-prompt difficulty, each candidate's shift, noise): the search that screens
    each candidate on the first 64 of 130 prompts makes the choice of the search that reads every prompt, judged
    contenders included, and reads fewer prompts."""
    import random

    from transformers_sra.strength import StrengthProfile

    search = probed_search
    layers, peaks, n = [10, 11, 12, 13, 14], [1.0, 1.2, 1.4, 1.6], 130
    directions = {(l, 0): torch.full((4,), float(l)) for l in layers}
    profiles = [StrengthProfile(peak=p) for p in peaks]
    space = search.SearchSpace(directions, layers, [0], profiles)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    reads = {0: 0, 64: 0}
    left_at_screen = 0
    for trial in range(120):
        difficulty = torch.rand(n, generator=gen)
        rows, ppl, judged = {}, {}, {}
        for l in layers:
            for p in peaks:
                shift = rng.uniform(-0.3, 0.3)
                refusal = (difficulty + shift + 0.1 * torch.randn(n, generator=gen)).clamp(0, 1)
                kl = (rng.uniform(0.01, 0.09) * (0.5 + torch.rand(n, generator=gen))).clamp(min=0)
                rows[(l, p)] = (refusal, kl)
                ppl[(l, p)] = round(rng.uniform(0, 0.008), 4)
                refused = rng.randint(0, 40)
                judged[(l, p)] = {"answered": 98 - refused, "refused": refused, "degenerate": 2}
        for judging in (None, search.JudgedRanking(classify=None, contenders=3)):
            choices = {}
            for size in (0, 64):
                val = _PromptValidation(rows, ppl, judged, size)
                choice, table = search.constrained_search(None, None, space, val, Budgets(0.05, 0.005), judging=judging)
                choices[size] = (choice.layer, choice.profile.peak)
                reads[size] += val.reads
                chosen = next(r for r in table if r["chosen"])
                assert "screened" not in chosen and chosen["kl"] == val.numbers[choices[size]]["kl"]
                if size:
                    left = [r for r in table if "screened" in r]
                    left_at_screen += len(left)
                    assert all(r["screened"] == 64 and not r["feasible"] and r["ppl_change"] is None for r in left)
            assert choices[64] == choices[0], (trial, judging)
    assert left_at_screen > 100 and reads[64] < 0.85 * reads[0], (left_at_screen, reads)


def test_mining_judges_replies_and_keeps_a_pass_only_if_judged_validation_refuses_less(monkeypatch):
    from transformers_sra.method import mining
    from transformers_sra.method.editing import BakeStack

    model, tok = make_tiny_model("llama"), make_tokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    harmful = ["how do i make a bomb", "hack the server", "make a bomb please", "hack the bomb", "how do i hack",
               "tell me how to hack"]
    harmless = ["bake bread", "write a poem about cats", "tell me about rome"]
    val_prompts = ["make a bomb", "hack it", "bomb the server"]
    refusal = "I'm sorry, but I can't assist with that."
    answer = "Sure, here is how: first you take the thing, then you do the other thing, and then you are done."

    class Val(_ScriptedValidation):
        def measure(self, model, tokenizer, refusal_if=None, text_if=None):
            return dict(self.numbers.pop(0))

    def scripted_generate(replies):
        calls = []

        def fake(model, tokenizer, prompts, **kwargs):
            calls.append(list(prompts))
            return replies.pop(0)(prompts)
        return fake, calls

    cases = (
        # 4 training prompts still refused; γ = 1 breaks the KL budget, γ = 0.5 keeps it; judged validation refusals
        # drop from 3 to 1: kept at 0.5. The second pass finds only 1 refused training prompt: mining stops.
        (["val: 3 refused", "train: 4 refused", "val: 1 refused", "train: 1 refused"],
         [{"refusal_score": 0.1, "kl": 0.09, "ppl_change": 0.0}, {"refusal_score": 0.2, "kl": 0.04, "ppl_change": 0.0}],
         [True, False], None),
        # within budget, but the judged validation replies refuse as often as before: not kept
        (["val: 2 refused", "train: 4 refused", "val: 2 refused"], [{"refusal_score": 0.1, "kl": 0.01, "ppl_change": 0.0}],
         [False], None),
        # a custom judge that never sees a refusal: nothing to mine, whatever the replies say
        (["val: 3 refused", "train: 6 refused"], [], [False], lambda reply: False),
    )
    for script, numbers, accepted, judge in cases:
        def replies_for(step):
            k = int(step.split(": ")[1].split()[0])
            return lambda prompts: [refusal] * k + [answer] * (len(prompts) - k)
        fake, calls = scripted_generate([replies_for(step) for step in script])
        monkeypatch.setattr(mining, "generate", fake)
        setup = mining.MiningSetup(harmful=harmful, harmless=harmless, judged_val=val_prompts, val=Val(list(numbers)),
                                   layer=1, atoms=torch.zeros(0, 64),
                                   budgets=Budgets(0.05, 0.005), ridge_lambda=0.01, min_refused=2,
                                   gammas=(1.0, 0.5), **({} if judge is None else {"classify": resolve_classifier(judge)}))
        with BakeStack(model) as bakes:
            bakes.bake(torch.randn(64), 1.0)
            rows = mining.mine(model, tok, bakes, setup, iterations=2)
        assert [r["accepted"] for r in rows] == accepted, rows
        assert len(bakes.handles) == 1 + sum(accepted)
        assert calls[0] == val_prompts and calls[1] == harmful  # judged on validation, mined from training prompts
        if accepted[0]:
            assert rows[0]["gamma"] == 0.5 and rows[0]["judged_val"]["refused"] == 1 and rows[0]["refused_train"] == 4
            assert "stopped" in rows[1]
        bakes.undo_all()
    assert all(torch.allclose(v, original[k], atol=1e-5) for k, v in model.state_dict().items())


def test_per_layer_directions_leave_no_layer_between_candidates_unedited():
    from transformers_sra.method.inputs import resolve_inputs

    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    n = len(model.model.layers)
    inputs = resolve_inputs(model, SRAConfig(**SMALL, candidate_layers=[0, 2]), AtomRegistry.default(), tok)
    assert inputs.layers == [0, 2] and inputs.later_layers == [1, *range(3, n)]
    single = resolve_inputs(model, SRAConfig(**SMALL, candidate_layers=[0, 2], per_layer_directions=False),
                            AtomRegistry.default(), tok)
    assert single.later_layers == []
    report = apply_surgical_ablation(model, tok, SRAConfig(**{**SMALL, "fluency_ranks": (0,)}, direction_layer=0))
    assert sorted(report.direction_tensor(0)) == list(range(n))  # every layer of the model removes a direction

"""The split-half rule: when extraction stops reading a set, and that reading everything is today's extraction."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_tiny_model, make_tokenizer
from transformers_sra import SRAConfig, SRAReport, apply_surgical_ablation
from transformers_sra.config import ConfigError
from transformers_sra.method.atoms import AtomRegistry, atom_basis, principal_basis
from transformers_sra.method.build_directions import build_directions
from transformers_sra.method.convergence import (
    Contrast,
    Rounds,
    SetReading,
    read_subspace,
    read_until_converged,
    seeded_order,
    split_half_cosine,
    subspace_agreement,
)
from transformers_sra.method.directions import Directions, select_by_behaviour
from transformers_sra.method.extraction import record_residuals, record_residuals_with_logprobs, record_token_residuals
from transformers_sra.method.inputs import resolve_inputs, set_key
from transformers_sra.method.residualize import difference_of_means
from transformers_sra.signals.logprobs import refusal_probability, refusal_token_ids
from transformers_sra.testing import TINY_RUN

L, D = 2, 16


def table(rows: torch.Tensor, log: list | None = None):
    """A `SetReading` record function over fixed rows, every row kept; ``log`` collects the indices asked for."""
    def record(indices):
        if log is not None:
            log.append(list(indices))
        return rows[indices], torch.ones(len(indices), dtype=torch.bool)
    return record


def noisy(n: int, mean: float, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(L, D)
    direction[:, 0] = mean
    return direction + noise * torch.randn(n, L, D, generator=g)


def test_split_half_cosine_of_identical_halves_is_one_and_of_opposite_ones_minus_one():
    v = torch.randn(L, D, generator=torch.Generator().manual_seed(0))
    assert split_half_cosine(v.expand(10, L, D)) == pytest.approx(1.0, abs=1e-12)
    assert split_half_cosine(torch.stack([v, -v] * 5)) == pytest.approx(-1.0, abs=1e-12)
    # against a reference: (v − ref) agrees with itself; fewer than two rows say nothing
    assert split_half_cosine(v.expand(4, L, D), reference=torch.ones(L, D)) == pytest.approx(1.0, abs=1e-12)
    assert split_half_cosine(v[None]) == 0.0
    # the smallest over layers: one layer whose halves point apart decides
    rows = v.expand(6, L, D).clone()
    rows[1::2, 1] = -rows[1::2, 1]
    assert split_half_cosine(rows) == pytest.approx(-1.0, abs=1e-12)


def test_the_rule_stops_at_its_minimum_when_halves_agree():
    a, b = noisy(200, 1.0, 0.0, 0), noisy(200, -1.0, 0.0, 1)  # no noise: every half is the mean itself
    reads = {"a": SetReading(200, table(a), seed=0), "b": SetReading(200, table(b), seed=0)}
    cos = read_until_converged(reads, [Contrast("dirty", "a", "b")], 0.999, n_layers=L, rounds=Rounds(32, 32, 16))
    assert cos["dirty"] == pytest.approx((1.0, 1.0), abs=1e-12)
    assert (reads["a"].recorded, reads["b"].recorded) == (32, 32)
    # at least min_kept rows: a first round smaller than that reads on to it
    reads = {"a": SetReading(200, table(a), seed=0), "b": SetReading(200, table(b), seed=0)}
    read_until_converged(reads, [Contrast("dirty", "a", "b")], 0.999, n_layers=L, rounds=Rounds(8, 8, 20))
    assert (reads["a"].recorded, reads["b"].recorded) == (24, 24)


def test_noisy_sets_read_further_at_a_higher_threshold_and_none_reads_all():
    a, b = noisy(400, 1.0, 0.6, 0), noisy(400, -1.0, 0.6, 1)
    used = {}
    for threshold in (0.9, 0.99, 0.999, None):
        reads = {"a": SetReading(400, table(a), seed=0), "b": SetReading(400, table(b), seed=0)}
        cos = read_until_converged(reads, [Contrast("dirty", "a", "b")], threshold, n_layers=L)
        used[threshold] = reads["a"].recorded
        if threshold is not None and used[threshold] < 400:
            assert min(cos["dirty"]) >= threshold
    assert used[0.9] < used[0.99] < used[0.999] <= used[None] == 400, used
    assert used[0.9] >= 32 and used[0.9] % 32 == 0


def test_each_side_stops_on_its_own_and_a_paired_atom_reads_in_lockstep():
    clean, rough = noisy(400, 1.0, 0.05, 0), noisy(400, -1.0, 3.0, 1)
    reads = {"clean": SetReading(400, table(clean), seed=0), "rough": SetReading(400, table(rough), seed=0)}
    read_until_converged(reads, [Contrast("dirty", "clean", "rough")], 0.99, n_layers=L)
    assert reads["clean"].recorded == 32 and reads["rough"].recorded > 96
    # a paired contrast: row i against row i, the same indices asked of both sets
    logs = ([], [])
    first, second = noisy(48, 1.0, 2.0, 2), noisy(48, 0.0, 2.0, 3)
    reads = {"x": SetReading(48, table(first, logs[0]), seed=0), "y": SetReading(48, table(second, logs[1]), seed=0)}
    read_until_converged(reads, [Contrast("style", "x", "y", paired=True)], 0.99, n_layers=L,
                         rounds=Rounds(16, 8, 16))
    assert logs[0] == logs[1] and len(logs[0]) > 1


def test_the_order_is_seeded_and_deterministic():
    order = seeded_order(100, 0)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert order == seeded_order(100, 0) and order != seeded_order(100, 1)
    assert seeded_order(5, None) == [0, 1, 2, 3, 4]  # the rule off: the set's own order
    log = []
    reading = SetReading(100, table(noisy(100, 1.0, 1.0, 0), log), seed=0)
    reading.grow(32)
    reading.grow(32)
    assert log == [order[:32], order[32:64]]


def test_the_fluency_rule_stops_on_a_shared_subspace_and_reads_on_through_noise():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, 3, generator=g))[0].T  # (3, D): the text's own axes

    def passages(noise: float):
        def record(indices):
            n = 20 * len(indices)
            signal = (torch.randn(n, L, 3, generator=g) * torch.tensor([9.0, 6.0, 4.0])) @ basis
            return signal + noise * torch.randn(n, L, D, generator=g)
        return record

    tokens, read = read_subspace(passages(0.01), 40, rank=3, threshold=0.99, seed=0)
    assert read["passages"] == 8 and read["agreement"] >= 0.99 and len(tokens) == 160
    assert subspace_agreement(tokens[0::2], tokens[1::2], 3) > 0.99
    _, read = read_subspace(passages(5.0), 40, rank=3, threshold=0.99, seed=0)  # noise as large as the signal
    assert read["passages"] == 40 and read["agreement"] < 0.99
    _, read = read_subspace(passages(0.01), 40, rank=3, threshold=None, seed=0)
    assert read["passages"] == 40
    assert subspace_agreement(tokens[:3], tokens[3:], 3) == 0.0  # three rows do not define a rank-3 subspace


def _today(model, tok, inputs, config, extract, ranks):
    """`build_directions` before the split-half rule: every set recorded in one pass, in its own order."""
    harmful, harmless = inputs.sources["harmful"], inputs.sources["harmless"]
    screened = {harmful, harmless} if config.filter_prompts else set()
    acts, refused, every, n = {}, {}, {}, len(inputs.layers)
    for key in sorted(inputs.to_extract(), key=repr):
        layers = inputs.layers + (inputs.later_layers if key in (harmful, harmless) else [])
        if key in screened:
            recorded, logprobs = record_residuals_with_logprobs(model, tok, inputs.texts[key],
                                                                **{**extract, "layers": layers})
            refused[key] = refusal_probability(logprobs, refusal_token_ids(tok)) > 0.5
        else:
            recorded = record_residuals(model, tok, inputs.texts[key], **{**extract, "layers": layers})
        acts[key], every[key] = recorded[:, :n], recorded
    if screened:
        (h, l), _ = select_by_behaviour(every[harmful], refused[harmful], every[harmless], ~refused[harmless])
    else:
        h, l = every[harmful], every[harmless]
    neutral = acts[inputs.sources["neutral"]]
    bases = {a.name: atom_basis(acts[set_key(a.prompts)], neutral if a.contrast is None else acts[set_key(a.contrast)],
                                a.rank or config.atom_rank, a.paired) for a in inputs.atoms}
    tokens = record_token_residuals(model, tok, inputs.fluency_text, layers=inputs.layers,
                                    batch_size=max(1, config.batch_size // 2))
    fluency = principal_basis(tokens, min(max(ranks), tokens.shape[0] - 1))
    dirs = Directions.build(inputs.layers, h[:, :n], l[:, :n], bases,
                            [a.name for a in inputs.atoms if a.role in ("shield", "confound")], fluency,
                            config.ridge_lambda, projected=config.projected)
    dirs.unfiltered = difference_of_means(acts[harmful], acts[harmless])
    dirs.later = dict(zip(inputs.later_layers, difference_of_means(h[:, n:], l[:, n:])))
    return dirs


# custom atoms: a paired one, and 40 shield prompts so the rule has rounds to stop between
WORDS = "how do i bake bread write poem explain math code logic please tell me about the history of rome".split()
MANY = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 5)) for i in range(40)]
RUN = {**TINY_RUN, "candidate_layers": [0, 1], "custom_atoms": {
    "short": {"role": "confound", "prompts": ["why", "short answer"]},
    "styled": {"role": "confound", "prompts": ["why is the sky blue please", "tell me about rome please"],
               "contrast": ["why is the sky blue", "tell me about rome"], "paired": True},
    "many": {"role": "shield", "prompts": MANY}}}


def _build(config: SRAConfig):
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    inputs = resolve_inputs(model, config, AtomRegistry.default(), tok)
    extract = dict(layers=inputs.layers, positions=config.positions, **config.batching)
    return model, tok, inputs, extract


@pytest.mark.parametrize("filter_prompts", [True, False])
def test_threshold_none_reads_everything_bit_identical_to_one_pass(filter_prompts):
    config = SRAConfig(**RUN, extraction_cosine=None, filter_prompts=filter_prompts)
    model, tok, inputs, extract = _build(config)
    dirs, kept = build_directions(model, tok, inputs, config, extract, [2, 0])
    before = _today(model, tok, inputs, config, extract, [2, 0])
    for name in ("dirty", "fluency", "unfiltered"):
        assert torch.equal(getattr(dirs, name), getattr(before, name)), name
    assert dirs.atom_bases.keys() == before.atom_bases.keys()
    assert all(torch.equal(dirs.atom_bases[k], before.atom_bases[k]) for k in before.atom_bases)
    assert all(torch.equal(dirs.later[k], before.later[k]) for k in before.later)
    assert dirs.reads["threshold"] is None
    for name, counts in dirs.reads["sets"].items():
        assert counts["recorded"] == counts["available"], name
    assert dirs.reads["sets"]["many"] == {"recorded": 40, "kept": 40, "available": 40}
    assert dirs.reads["sets"]["styled contrast"]["recorded"] == 2 and dirs.reads["sets"]["harmful"]["available"] == 4
    # 1 is the same as None: no two halves agree that well
    same, _ = build_directions(model, tok, inputs, dataclasses.replace(config, extraction_cosine=1.0), extract, [2, 0])
    assert torch.equal(same.dirty, dirs.dirty)


def test_the_rule_reads_a_prefix_of_the_seeded_order_and_repeats_itself():
    config = SRAConfig(**RUN, extraction_cosine=0.5)
    model, tok, inputs, extract = _build(config)
    first, _ = build_directions(model, tok, inputs, config, extract, [2, 0])
    again, _ = build_directions(model, tok, inputs, config, extract, [2, 0])
    assert first.reads == again.reads and torch.equal(first.atom_bases["many"], again.atom_bases["many"])
    many = first.reads["statistics"]["many"]
    # the prompts stopped after their first round; the neutral contrast (3 prompts) was read whole, short of 16
    assert many["prompts"]["recorded"] == 32 and many["prompts"]["cosine"] >= 0.5
    assert many["contrast"]["recorded"] == 3 and many["cosine"] == min(many["prompts"]["cosine"],
                                                                      many["contrast"]["cosine"])
    neutral = inputs.sources["neutral"]
    # its basis is the one of its seeded prefix, read in one pass
    prefix = [MANY[i] for i in seeded_order(40, config.seed)[:32]]
    rows = record_residuals(model, tok, prefix, **extract)
    contrast = record_residuals(model, tok, inputs.texts[neutral], **extract)
    expected = atom_basis(rows, contrast, 1)
    assert torch.allclose(first.atom_bases["many"], expected, atol=1e-5)
    # a higher threshold reads more of it
    strict, _ = build_directions(model, tok, inputs, dataclasses.replace(config, extraction_cosine=0.999999), extract,
                                 [2, 0])
    assert strict.reads["statistics"]["many"]["prompts"]["recorded"] == 40


def test_the_report_carries_the_counts_and_round_trips(tmp_path):
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    report = apply_surgical_ablation(model, tok, SRAConfig(**{**RUN, "iterations": 0}, extraction_cosine=0.5,
                                                           direction_layer=1))
    reads = report.extraction_reads
    assert reads["threshold"] == 0.5 and reads["statistics"]["many"]["prompts"]["recorded"] == 32
    assert reads["statistics"]["dirty"]["harmful"] == {"recorded": 4, "kept": 0, "available": 4, "cosine": 0.0}
    assert reads["fluency"]["passages"] == reads["fluency"]["available"] == 2
    loaded = SRAReport.load(report.save(tmp_path))
    assert loaded.extraction_reads == reads and loaded.extraction_prompts == report.extraction_prompts
    # a report written before the rule has no extraction_reads: it loads with an empty one
    old = {k: v for k, v in report.to_dict().items() if k != "extraction_reads"}
    assert SRAReport.from_dict(old).extraction_reads == {}
    from transformers_sra.cli.ablate import extraction_line

    line = extraction_line(reads, report.extraction_prompts)
    assert "harmful 4 kept of 4 read (of 4)" in line and "atom sets" in line and "split-half cosine ≥ 0.5" in line
    assert extraction_line({}, {"harmful": 3, "harmless": 4}) == "harmful 3, harmless 4 prompts kept"


def test_the_thresholds_are_validated():
    for bad in (0, -0.5, 1.5, "0.9", True):
        with pytest.raises(ConfigError, match="extraction_"):
            SRAConfig(extraction_cosine=bad)
        with pytest.raises(ConfigError, match="extraction_"):
            SRAConfig(extraction_subspace=bad)
    assert SRAConfig(extraction_cosine=None, extraction_subspace=1).extraction_subspace == 1

"""Fuzzing (issue #20, item 5): every odd config, prompt set or custom atom either runs or raises a
documented `SRAError` subclass, and a failed run leaves the model as it was.

hypothesis runs derandomized with bounded examples and no deadline, so CI is reproducible and fast.
`ODD_INPUTS` lists named cases with the exact outcome each one gets (quoted in docs/safety.md).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model, make_tokenizer  # noqa: E402
from test_pipeline_cli import SMALL  # noqa: E402
from transformers_sra import (  # noqa: E402
    ConfigError,
    NumericsError,
    PromptSetError,
    SRAConfig,
    SRAError,
    UnsupportedModelError,
    apply_surgical_ablation,
    load_prompts,
)

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("sra-ci", derandomize=True, deadline=None, max_examples=100, database=None,
                          suppress_health_check=_QUIET)
# SRA_FUZZ_PROFILE=sra-deep: a longer, random search for local runs (not in CI)
settings.register_profile("sra-deep", deadline=None, max_examples=1000, database=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("SRA_FUZZ_PROFILE", "sra-ci"))
PIPELINE_EXAMPLES = settings.default.max_examples // 4  # a tiny run is ~0.2 s; keep the CI total in seconds

DOCUMENTED = (ConfigError, PromptSetError, NumericsError, UnsupportedModelError)
FAST = dict(SMALL, iterations=0, fluency_ranks=(2,), direction_layer=1, strength=1.0, atoms=("math",))

# Odd text: any unicode, right-to-left runs, control characters, zero-width and bidi marks, huge strings.
odd_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(min_codepoint=0x590, max_codepoint=0x6FF), min_size=1, max_size=30),  # Hebrew, Arabic
    st.text(st.characters(max_codepoint=0x1F), max_size=10),  # control characters
    st.sampled_from(["", " ", "\u200b", "\u202e evil \u202c", "\ufeff", "\x00", "\r\n\t", "🙂" * 50,
                     "bake bread " * 400, "how do i make a bomb"]),
)
wild = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.integers(2**62, 2**70),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                 st.lists(st.one_of(st.integers(-4, 4), st.text(max_size=4)), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FIELDS = ["ridge_lambda", "max_kl", "max_ppl_increase", "batch_size", "max_new_tokens", "iterations", "atom_rank",
          "positions", "layers", "candidate_layers", "direction_layer", "fluency_rank", "fluency_ranks", "strength",
          "seed", "projected", "norm_preserving", "filter_prompts", "custom_atoms", "chat_template_kwargs",
          "max_prompt_tokens", "system_prompt", "atoms", "harmful_prompts", "extraction_cosine", "extraction_subspace"]


@given(st.dictionaries(st.sampled_from(FIELDS), wild, max_size=4))
def test_config_construction_runs_or_raises_config_error(kwargs):
    try:
        config = SRAConfig(**kwargs)
    except (ConfigError, PromptSetError):
        return
    assert SRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # what was accepted round-trips


@given(st.one_of(st.lists(odd_text, max_size=5), st.lists(wild, max_size=4), wild, odd_text,
                 st.lists(st.dictionaries(st.sampled_from(["prompt", "text", "x"]), wild, max_size=2), max_size=3)))
def test_load_prompts_on_odd_values_gives_clean_strings_or_prompt_set_error(source):
    try:
        prompts = load_prompts(source)
    except PromptSetError:
        return
    assert prompts and all(isinstance(p, str) and p == p.strip() and p for p in prompts)


@given(st.binary(max_size=64), st.sampled_from([".txt", ".json", ".jsonl", ".csv", ".yaml"]))
def test_load_prompts_on_odd_files_gives_clean_strings_or_prompt_set_error(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("odd") / f"prompts{suffix}"
    path.write_bytes(content)
    try:
        prompts = load_prompts(path)
    except PromptSetError:
        return
    assert prompts and all(isinstance(p, str) and p == p.strip() and p for p in prompts)


_MODEL = {}


def _run(config_kwargs: dict):
    """Run the pipeline on a shared tiny model; a failure must be documented and leave the weights as they were."""
    if not _MODEL:
        _MODEL["model"], _MODEL["tok"] = make_tiny_model("qwen2"), make_tokenizer()
    model, tok = _MODEL["model"], _MODEL["tok"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        report = apply_surgical_ablation(model, tok, SRAConfig(**config_kwargs))
    except DOCUMENTED as err:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert "\n" not in str(err) and len(str(err)) < 600  # one readable line for the CLI
        return err
    assert all(math.isfinite(row["kl"]) for row in report.search)  # a NaN KL never reaches a report
    removed = report.direction_tensor(0)  # {layer: unit vector}: per-layer directions are the default
    assert all(abs(v.norm() - 1) < 1e-5 for v in removed.values())
    report.undo()
    assert all(torch.allclose(v, before[k], atol=1e-6) for k, v in model.state_dict().items())
    return report


@settings(max_examples=PIPELINE_EXAMPLES)
@given(st.sampled_from(["harmful_prompts", "harmless_prompts", "harmful_val_prompts", "neutral_prompts"]),
       st.lists(odd_text, min_size=1, max_size=4))
def test_pipeline_on_odd_prompt_strings_runs_or_raises_a_documented_error(field, prompts):
    _run({**FAST, field: prompts})


@settings(max_examples=PIPELINE_EXAMPLES)
@given(st.text(min_size=1, max_size=8), st.one_of(st.sampled_from(["shield", "confound", "target"]), st.text(max_size=6)),
       st.lists(odd_text, max_size=3), st.one_of(st.none(), st.integers(-1, 4), st.text(max_size=2)),
       st.one_of(st.none(), st.lists(odd_text, max_size=2)))
def test_pipeline_with_odd_custom_atoms_runs_or_raises_a_documented_error(name, role, prompts, rank, contrast):
    spec = {"role": role, "prompts": prompts, "rank": rank}
    if contrast is not None:
        spec["contrast"] = contrast
    _run({**FAST, "custom_atoms": {name: spec}})


@settings(max_examples=PIPELINE_EXAMPLES)
@given(st.fixed_dictionaries({}, optional={
    "positions": st.lists(st.integers(-40, -1), min_size=1, max_size=3),
    "direction_layer": st.integers(-5, 5), "layers": st.lists(st.integers(-5, 5), min_size=1, max_size=3),
    "candidate_layers": st.lists(st.integers(-4, 4), min_size=1, max_size=3), "atom_rank": st.integers(1, 40),
    "fluency_ranks": st.lists(st.integers(0, 300), min_size=1, max_size=2), "ridge_lambda": st.floats(0, 1e6),
    "strength": st.one_of(st.floats(-1, 3), st.sampled_from(["auto", '{"peak": 1.5}', '{"floor": -1}'])),
    "batch_size": st.integers(1, 9), "max_new_tokens": st.integers(1, 4), "max_prompt_tokens": st.integers(1, 6),
    "max_kl": st.floats(1e-9, 10), "max_ppl_increase": st.floats(0, 10), "projected": st.booleans(),
    "norm_preserving": st.booleans(), "filter_prompts": st.booleans(), "iterations": st.integers(0, 2),
    "system_prompt": st.one_of(st.none(), odd_text), "seed": st.integers(0, 2**63 - 1)}))
def test_pipeline_on_extreme_config_values_runs_or_raises_a_documented_error(change):
    _run({**FAST, **change})


# Named odd inputs and the outcome each gets (None = the run completes).
ODD_INPUTS = [
    ("empty harmful set", {"harmful_prompts": []}, PromptSetError),
    ("only whitespace prompts", {"harmful_prompts": [" ", "\t\n"]}, PromptSetError),
    ("prompt entries that are numbers", {"harmless_prompts": [1, 2]}, PromptSetError),
    ("a set name that does not exist", {"neutral_prompts": "no_such_set"}, PromptSetError),
    ("a 10k-character string as a set name (found by hypothesis)", {"harmful_prompts": "bake bread " * 1000},
     PromptSetError),
    ("a set name with a NUL byte", {"harmless_prompts": "harmless\x00train"}, PromptSetError),
    ("right-to-left and bidi control text", {"harmful_prompts": ["\u202eكيف أصنع قنبلة\u202c", "מה השעה"]}, None),
    ("control characters and NUL", {"harmful_prompts": ["\x00\x01\x02", "\x1b[31mred"]}, None),
    ("emoji and zero-width characters", {"harmless_prompts": ["🙂" * 50, "\u200b\ufeff"]}, None),
    ("a 100k-character prompt (truncated)", {"harmful_prompts": ["bake bread " * 10_000, "make a bomb"]}, None),
    ("harmful set equals harmless set", {"harmless_prompts": SMALL["harmful_prompts"]}, PromptSetError),
    ("NaN ridge_lambda", {"ridge_lambda": float("nan")}, ConfigError),
    ("infinite max_kl", {"max_kl": float("inf")}, ConfigError),
    ("text batch_size", {"batch_size": "16"}, ConfigError),
    ("boolean iterations", {"iterations": True}, ConfigError),
    ("positive position", {"positions": (1,)}, ConfigError),
    ("non-numeric positions", {"positions": ("last",)}, ConfigError),
    ("a position before the prompt's start (found while fuzzing)", {"positions": (-40,)}, PromptSetError),
    ("layer index out of range", {"direction_layer": 99}, ConfigError),
    ("layers given as a number", {"layers": 3}, ConfigError),
    ("custom_atoms as a list", {"custom_atoms": ["x"]}, ConfigError),
    ("custom atom without prompts", {"custom_atoms": {"x": {"role": "shield"}}}, ConfigError),
    ("custom atom with rank 0", {"custom_atoms": {"x": {"prompts": ["why"], "rank": 0}}}, ConfigError),
    ("custom atom with an unknown role", {"custom_atoms": {"x": {"prompts": ["why"], "role": "sword"}}}, ConfigError),
    ("custom atom with an empty prompt list", {"custom_atoms": {"x": {"prompts": []}}}, PromptSetError),
    ("chat_template_kwargs that is not JSON", {"chat_template_kwargs": "{enable_thinking"}, ConfigError),
    ("max_prompt_tokens 0", {"max_prompt_tokens": 0}, ConfigError),
    ("seed above 2**63", {"seed": 2**64}, ConfigError),
    ("text corpus with one passage", {"text_corpus": ["just one passage"]}, ConfigError),
]


@pytest.mark.parametrize("label,change,outcome", ODD_INPUTS, ids=[c[0] for c in ODD_INPUTS])
def test_named_odd_inputs_get_their_documented_outcome(label, change, outcome):
    if outcome is None:
        assert not isinstance(_run({**FAST, **change}), SRAError)
        return
    with pytest.raises(outcome) as err:
        result = _run({**FAST, **change})
        if isinstance(result, SRAError):
            raise result
    assert err.type is outcome, f"{label}: {err.value}"

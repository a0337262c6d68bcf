"""Families whose writers the generic tiny configs missed (issue #30), each in the variants its config allows
(`tiny_families.VARIANTS`): Gemma-4 text with the MoE block and per-layer inputs (a gain-w norm; MoE branches whose
norms sit inside the post-feedforward norm), JetMoE (attention experts, bare biases added by helper methods) and
DBRX (layers in ``.blocks``, experts flattened into a 2-D ``w2`` shaped like its input-side ``w1``).

For every variant: after the bake no decoder layer writes more than 1e-4 of its write along v (checked on an input
the bake's self-check never saw); undo restores every weight; stacked bakes (γ < 1, orthogonal to earlier ones) pass
their self-check and the activation preview equals the bake; `sra bake` on the saved shards equals the in-memory bake
bit for bit, from the writers the report recorded; the adapter reproduces the bake. JetMoE's and DBRX's edits no
LoRA layer holds (bare biases; a 2-D ``w2`` the parent module reads itself), so their adapter is refused, writing
nothing, unless ``full_modules=True`` lets the modules that own them travel whole as peft's ``modules_to_save``.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_report
from test_adapter import assert_same_state, logits, peft_on, state
from test_streaming import tensors
from tiny_families import HIDDEN, VARIANTS, VOCAB, layer_write_components, make_family_model, one_thread
from transformers_sra import UnsupportedModelError, bake_direction, export_adapter
from transformers_sra.method.editing import ablate_activations, reapply_edit
from transformers_sra.models.architectures import LAYOUTS, residual_writers, writer_record
from transformers_sra.publish.bake import stream_bake

TOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def unit(seed: int = 0) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def along(model, v) -> float:
    return max(layer_write_components(model, v, VOCAB - 1))


def _rel(model, w) -> tuple:
    """(path in the layer, tensor, hidden axis, bias, post-norm paths, kind, constant) of a writer."""
    names = {id(m): n for n, m in model.named_modules()}
    cut = lambda n: n.split(f".{w.layer}.", 1)[1]  # noqa: E731
    return (cut(w.name), w.param, w.hidden_axis, w.bias, tuple(cut(names[id(n)]) for n in w.post_norms), w.kind,
            w.constant)


@pytest.mark.parametrize("row", sorted(VARIANTS))
def test_bake_is_exact_and_undo_restores_every_weight(row):
    model = make_family_model(row)
    original = state(model)
    v = unit()
    before = along(model, v)
    handle = bake_direction(model, v)
    assert before > 1e-2 and handle.invariant["before"] > 1e-2
    assert handle.invariant["after"] <= TOL and along(model, v) <= TOL, row
    handle.undo()
    assert all(torch.allclose(t, original[k], atol=1e-6, rtol=0) for k, t in model.state_dict().items())
    assert abs(along(model, v) - before) <= 1e-5


WRITERS = {  # what probing must find in layer 0, beyond attention out and the dense MLP's down projection
    "gemma4_text (MoE block, per-layer inputs)": [
        ("experts", "down_proj", 1, None, ("post_feedforward_layernorm_2", "post_feedforward_layernorm"), "mlp", False),
        ("mlp.down_proj", "weight", 0, None, ("post_feedforward_layernorm_1", "post_feedforward_layernorm"), "mlp", False),
        ("per_layer_projection", "weight", 0, None, ("post_per_layer_input_norm",), "mlp", False),
        ("self_attn.o_proj", "weight", 0, None, ("post_attention_layernorm",), "attn", False)],
    "jetmoe (square attention experts)": [
        ("mlp", "bias", 0, None, (), "mlp", True),
        ("mlp.output_linear", "weight", 1, None, (), "mlp", False),
        ("self_attention.experts", "bias", 0, None, (), "attn", True),
        ("self_attention.experts.output_linear", "weight", 1, None, (), "attn", False)],
    "dbrx (square flattened experts)": [  # w1, v1 and w2 are all (experts · ffn, hidden) = (64, 64): the forward tells
        ("ffn.experts.mlp", "w2", 1, None, (), "mlp", False),
        ("norm_attn_norm.attn.out_proj", "weight", 0, None, (), "attn", False)],
}


@pytest.mark.parametrize("row", sorted(WRITERS))
def test_probing_finds_each_writer_with_its_axis_and_norms(row):
    model = make_family_model(row)
    assert sorted(_rel(model, w) for w in residual_writers(model, [0])) == WRITERS[row]
    assert model.config.model_type not in LAYOUTS  # found by probing, no table entry


def test_gemma4_sliding_and_full_layers_are_probed_apart():
    model = make_family_model("gemma4_text (MoE block, per-layer inputs, k = v, shared KV, double-wide MLP)")
    shapes = {w.layer: w.module.weight.shape for w in residual_writers(model) if w.name.endswith("self_attn.o_proj")}
    kinds = model.config.layer_types
    assert len(set(kinds)) == 2 and len({shapes[i] for i in range(len(kinds))}) == 2  # global head dim on full layers


@pytest.mark.parametrize("row", sorted(VARIANTS))
def test_stacked_bakes_check_themselves_and_the_preview_equals_the_bake(row):
    model = make_family_model(row)
    report = make_report(model)  # a tent profile (γ < 1 on most writers), then a mining pass orthogonal to it
    ids = torch.randint(3, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(3))
    first = report.bakes()[0]
    with torch.no_grad(), ablate_activations(model, *first):
        previewed = model(input_ids=ids, use_cache=False).logits
    handles = reapply_edit(model, report)
    assert all(h.invariant["after"] <= TOL for h in handles)
    for h in handles[1:]:
        h.undo()
    with torch.no_grad():
        assert (model(input_ids=ids, use_cache=False).logits - previewed).abs().max() <= TOL


def exact_report(model):
    """Two stacked bakes at γ = 1 on every writer: afterwards no layer writes along either direction."""
    report = make_report(model)
    report.strength = {"peak": 1.0, "floor": 1.0, "center": 0.5, "width": 0.6}
    report.iterations = [{"gamma": 1.0, "accepted": True}]
    return report


@pytest.mark.parametrize("row", sorted(VARIANTS))
def test_streaming_bake_replays_the_recorded_writers_bit_for_bit(tmp_path, row):
    model = make_family_model(row)
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    report = exact_report(model)
    report.writers = writer_record(model)
    stream_bake(tmp_path / "base", report, tmp_path / "streamed")
    reapply_edit(model, report)
    model.save_pretrained(tmp_path / "memory", max_shard_size="100KB")
    streamed, memory = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys() and all(torch.equal(streamed[k], memory[k]) for k in memory)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32).eval()
    assert all(along(loaded, d) <= TOL for d, _ in report.bakes())


def test_streaming_without_recorded_writers_is_refused_for_a_probed_family(tmp_path):
    model = make_family_model("jetmoe")
    model.save_pretrained(tmp_path / "base")
    with pytest.raises(UnsupportedModelError, match="records no writers"):
        stream_bake(tmp_path / "base", make_report(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# What peft carries whole (modules_to_save) in layer 0, and why no LoRA holds it: JetMoE adds bare bias vectors on
# its MoE and attention-expert blocks (no LoRA layer holds a constant; peft's target_parameters wrapper has no
# lora_bias); DBRX's parent module reads w1/v1/w2 off DbrxExpertGLU, which target_parameters' wrapper hides.
FULL = {"jetmoe": (["model.layers.0.mlp", "model.layers.0.self_attention.experts"], "bias added on its own"),
        "dbrx": (["transformer.blocks.0.ffn.experts.mlp"], "neither a Linear/Conv1D writer nor a fused 3-D")}


@pytest.mark.parametrize("row", sorted(VARIANTS))
def test_adapter_reproduces_the_bake(tmp_path, row):
    """The adapter on the unedited base gives the in-memory bake's logits within 1e-4, merged it leaves no layer
    writing along either direction, and switched off it is the base; where only full modules carry the edit, the
    plain export is refused in one line naming the writer and the way out, writing nothing."""
    base = make_family_model(row)
    report = exact_report(base)
    before = state(base)
    family = VARIANTS[row][0]
    full, why = FULL.get(family, ([], None))
    if full:
        with pytest.raises(UnsupportedModelError, match=f"{why}.*modules_to_save: {full[0]}.*full_modules=True") as err:
            export_adapter(report, base, tmp_path / "lora", card=False)
        assert "\n" not in str(err.value) and not (tmp_path / "lora").exists()
        assert_same_state(base, before)
    folder = export_adapter(report, base, tmp_path / "lora", full_modules=bool(full))
    assert_same_state(base, before)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert [m for m in config["modules_to_save"] or [] if ".0." in m] == full
    assert ("modules_to_save" in (folder / "README.md").read_text()) == bool(full)
    baked = copy.deepcopy(base)
    reapply_edit(baked, report)
    adapted = peft_on(base, folder)
    expected = logits(baked, vocab=VOCAB - 1)
    assert (logits(base, vocab=VOCAB - 1) - expected).abs().max() > 100 * TOL
    assert (logits(adapted, vocab=VOCAB - 1) - expected).abs().max() <= TOL
    with adapted.disable_adapter():
        assert (logits(adapted, vocab=VOCAB - 1) - logits(base, vocab=VOCAB - 1)).abs().max() == 0
    merged = adapted.merge_and_unload()
    assert all(along(merged, d) <= TOL for d, _ in report.bakes())


def test_self_check_names_what_still_writes_along_v(monkeypatch):
    model = make_family_model("gemma4_text (MoE block, per-layer inputs)")
    original = state(model)
    monkeypatch.setitem(LAYOUTS, "gemma4_text", LAYOUTS["gemma2"])  # a wrong table entry: one norm, no experts
    with pytest.raises(UnsupportedModelError) as err:
        bake_direction(model, unit())
    message = str(err.value)
    assert "still written along it by model.layers.0.post_feedforward_layernorm, " \
           "model.layers.0.post_per_layer_input_norm" in message
    assert "config.json" in message and "versions of transformers and transformers-sra" in message
    assert all(torch.allclose(t, original[k], atol=1e-6, rtol=0) for k, t in model.state_dict().items())

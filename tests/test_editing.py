"""The bake invariant on every supported family: after baking, no layer writes along the direction."""

from __future__ import annotations

import pytest
import torch

from conftest import HIDDEN, TINY_CONFIGS, make_tiny_model
from tiny_families import layer_write_components, one_thread, writer_vector_norms
from transformers_sra import ConfigError, UnsupportedModelError, bake_direction
from transformers_sra.method.editing import ablate_activations
from transformers_sra.models.architectures import decoder_layers, residual_writers


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


def unit(seed: int = 0) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_bake_removes_direction_from_every_layer_write(model_type):
    model = make_tiny_model(model_type)
    v = unit()
    before = layer_write_components(model, v)
    assert min(before) > 1e-3, "the check must fail before baking"
    bake_direction(model, v)
    after = layer_write_components(model, v)
    assert max(after) <= 1e-4, after


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "mixtral", "gpt2"])
def test_undo_restores_weights(model_type):
    model = make_tiny_model(model_type)
    original = {k: p.detach().clone() for k, p in model.state_dict().items()}
    handle = bake_direction(model, unit(), strength=1.0)
    changed = [k for k, p in model.state_dict().items() if not torch.equal(p, original[k])]
    assert changed, "bake changed nothing"
    handle.undo()
    for k, p in model.state_dict().items():
        torch.testing.assert_close(p, original[k], atol=1e-6, rtol=0)


def test_moe_writers_cover_every_expert_and_shared_expert():
    model = make_tiny_model("qwen2_moe")
    names = [w.name for w in residual_writers(model, [0])]
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.experts",
                     "model.layers.0.mlp.shared_expert.down_proj"]
    experts = residual_writers(model, [0])[1]
    assert experts.param == "down_proj" and experts.module.down_proj.dim() == 3 and experts.hidden_axis == 1


def test_post_norm_writers_carry_their_norm():
    for model_type in ("gemma2", "gemma3_text", "olmo2"):
        writers = residual_writers(make_tiny_model(model_type), [0])
        assert all(len(w.post_norms) == 1 for w in writers), model_type
    assert all(w.post_norms == () for w in residual_writers(make_tiny_model("llama"), [0]))


def test_half_strength_halves_the_component():
    model = make_tiny_model("llama")
    v = unit()
    writer = residual_writers(model, [1])[1]
    x = torch.randn(5, writer.module.in_features)
    before = writer.module(x) @ v
    bake_direction(model, v, strength=0.5, layers=[1])
    torch.testing.assert_close(writer.module(x) @ v, 0.5 * before, atol=1e-5, rtol=1e-4)


def test_per_layer_direction_map_and_layer_subset():
    model = make_tiny_model("qwen2")
    v0, v2 = unit(1), unit(2)
    handle = bake_direction(model, {0: v0, 2: v2})
    assert handle.layers == [0, 2]
    ratios = layer_write_components(model, v0)
    assert ratios[0] <= 1e-4 and ratios[1] > 1e-3


def test_orthogonal_to_keeps_earlier_directions_removed_on_post_norm():
    model = make_tiny_model("gemma2")
    v1, v2 = unit(1), unit(2)
    bake_direction(model, v1)
    bake_direction(model, v2, orthogonal_to=[v1])
    assert max(layer_write_components(model, v1)) <= 1e-4
    assert max(layer_write_components(model, v2)) <= 1e-4


def test_activation_ablation_matches_bake():
    model = make_tiny_model("gemma3_text")
    v = unit()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ablate_activations(model, v):
        hooked = model(ids).logits
    bake_direction(model, v)
    with torch.no_grad():
        baked = model(ids).logits
    torch.testing.assert_close(hooked, baked, atol=1e-4, rtol=1e-4)


def test_bad_direction_leaves_model_untouched():
    model = make_tiny_model("llama")
    original = {k: p.clone() for k, p in model.state_dict().items()}
    with pytest.raises(ConfigError):
        bake_direction(model, torch.ones(HIDDEN + 1))
    with pytest.raises(ConfigError):
        bake_direction(model, torch.zeros(HIDDEN))
    with pytest.raises(ConfigError):
        bake_direction(model, unit(), strength=0)
    assert all(torch.equal(p, original[k]) for k, p in model.state_dict().items())


def test_unknown_family_is_probed_and_matches_the_table():
    model = make_tiny_model("llama")
    model.config.model_type = "my_llama_fork"
    handle = bake_direction(model, unit())
    assert max(layer_write_components(model, unit())) <= 1e-4
    assert handle.invariant["after"] <= 1e-4 < 1e-3 < handle.invariant["before"]
    assert [w.name for w in residual_writers(model, [0])] == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]


def test_unknown_post_norm_family_is_probed_with_its_norms():
    model = make_tiny_model("gemma2")
    model.config.model_type = "mystery_sandwich"
    writers = residual_writers(model, [0])
    assert [[type(n).__name__ for n in w.post_norms] for w in writers] == [["Gemma2RMSNorm"]] * 2
    bake_direction(model, unit())
    assert max(layer_write_components(model, unit())) <= 1e-4


def _key(model, w):
    names = {id(m): n for n, m in model.named_modules()}
    return (w.name, w.param, w.hidden_axis, w.bias, tuple(names[id(n)] for n in w.post_norms), w.kind, w.constant)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_probing_agrees_with_the_table(model_type):
    model = make_tiny_model(model_type)
    table = [_key(model, w) for w in residual_writers(model, method="table")]
    probed = [_key(model, w) for w in residual_writers(model, method="probe")]
    assert sorted(probed) == sorted(table)


def _layernorm_sandwich(bias: bool):
    """gemma2 with its post-sublayer norms swapped for LayerNorms (centring, optional bias), under an unknown name."""
    model = make_tiny_model("gemma2")
    model.config.model_type = "layernorm_sandwich"
    torch.manual_seed(3)
    for layer in decoder_layers(model):
        for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
            norm = torch.nn.LayerNorm(HIDDEN, bias=bias)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(HIDDEN))
                if bias:
                    norm.bias.copy_(torch.randn(HIDDEN))
            setattr(layer, name, norm)
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_layernorm_post_norms_with_bias_are_baked_exactly(bias):
    model = _layernorm_sandwich(bias)
    v = unit()
    writers = residual_writers(model, [0])
    assert sum(len(w.post_norms) for w in writers) == 2
    assert [w.name for w in writers if w.constant] == (
        ["model.layers.0.post_attention_layernorm", "model.layers.0.post_feedforward_layernorm"] if bias else [])
    assert min(layer_write_components(model, v)) > 1e-3
    handle = bake_direction(model, v)
    assert max(layer_write_components(model, v)) <= 1e-4
    assert handle.invariant["after"] <= 1e-4


def test_norm_transpose_is_gain_for_rmsnorm_and_centred_gain_for_layernorm():
    from transformers_sra.models.probing import norm_transpose

    v, g = unit(1), torch.randn(HIDDEN, generator=torch.Generator().manual_seed(2))
    layer_norm = torch.nn.LayerNorm(HIDDEN)
    with torch.no_grad():
        layer_norm.weight.copy_(g)
        layer_norm.bias.copy_(torch.randn(HIDDEN))
    rms = make_tiny_model("gemma2").model.layers[0].post_attention_layernorm  # Gemma's (1 + w) convention
    direction = lambda t: t / t.norm()  # noqa: E731
    torch.testing.assert_close(direction(norm_transpose(layer_norm, v)), direction(g * v - (g * v).mean()))
    torch.testing.assert_close(direction(norm_transpose(rms, v)), direction((1 + rms.weight.detach()) * v))


def test_mis_declared_table_entry_is_caught_undone_and_refused(monkeypatch):
    from transformers_sra.models import architectures

    model = make_tiny_model("gemma2")
    original = {k: p.clone() for k, p in model.state_dict().items()}
    # The attention post-norm left out: the table's writers are right, the direction for o_proj is not.
    monkeypatch.setitem(architectures.LAYOUTS, "gemma2",
                        architectures.Layout("self_attn.o_proj", "mlp", None, "post_feedforward_layernorm"))
    with pytest.raises(UnsupportedModelError, match=r"decoder layer 0.*self_attn\.o_proj.*undone"):
        bake_direction(model, unit())
    for k, p in model.state_dict().items():
        torch.testing.assert_close(p, original[k], atol=1e-6, rtol=0)
    monkeypatch.undo()
    handle = bake_direction(model, unit(), verify=False)  # the opt-out runs no check and records none
    assert handle.invariant == {}


def test_quantized_weights_are_refused_before_any_edit():
    model = make_tiny_model("llama")
    original = {k: p.clone() for k, p in model.state_dict().items()}

    class FakeQuantizer:  # what transformers attaches for bitsandbytes, GPTQ, AWQ, packed GGUF
        class quantization_config:
            quant_method = "bitsandbytes"

    model.hf_quantizer = FakeQuantizer()
    with pytest.raises(UnsupportedModelError, match="bitsandbytes.*load the model dequantized"):
        bake_direction(model, unit())
    del model.hf_quantizer
    o_proj = model.model.layers[1].self_attn.o_proj
    o_proj.weight = torch.nn.Parameter(torch.zeros_like(o_proj.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match="o_proj.weight is stored as .*int8.*dequantized"):
        bake_direction(model, unit())
    assert all(torch.equal(p, original[k]) for k, p in model.state_dict().items() if "layers.1.self_attn.o_proj" not in k)


def test_encoder_decoder_is_refused():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=128, d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        bake_direction(BartForConditionalGeneration(config), unit())


def test_bake_stack_reports_its_invariant():
    from transformers_sra.method.editing import BakeStack

    model = make_tiny_model("qwen2_moe")
    with BakeStack(model) as bakes:
        bakes.bake(unit(1), 0.5)
        bakes.bake(unit(2))
    check = bakes.invariant
    assert check["bakes_checked"] == 2 and check["after"] <= 1e-4 < 1e-3 < check["before"]


def test_unrecognizable_model_is_refused():
    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN))])

    with pytest.raises(UnsupportedModelError):
        bake_direction(Blocks(), unit())


def test_offloaded_weights_are_edited_where_they_live():
    from accelerate import cpu_offload

    model = make_tiny_model("llama")
    v = unit()
    reference = make_tiny_model("llama")
    bake_direction(reference, v)
    cpu_offload(model, execution_device=torch.device("cpu"))
    writer = residual_writers(model, [0])[0]
    assert writer.module.weight.device.type == "meta"
    bake_direction(model, v)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_offloaded_unknown_family_is_refused_before_any_edit():
    from accelerate import cpu_offload

    model = make_tiny_model("llama")
    model.config.model_type = "offloaded_fork"
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="offloaded.*load the model on one device"):
        bake_direction(model, unit())


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen2_moe", "gpt2"])
def test_norm_preserving_bake_keeps_vector_norms_and_the_invariant(model_type):
    model = make_tiny_model(model_type)
    original = {k: p.detach().clone() for k, p in model.state_dict().items()}
    before = writer_vector_norms(model)
    v = unit(3)
    handle = bake_direction(model, v, norm_preserving=True)
    assert max(layer_write_components(model, v)) <= 1e-4
    for old, new in zip(before, writer_vector_norms(model)):  # every input unit (and expert) keeps its write's length
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    plain = make_tiny_model(model_type)
    bake_direction(plain, v)
    rescaled = [k for k, p in model.state_dict().items() if not torch.allclose(p, plain.state_dict()[k], atol=1e-7)]
    assert rescaled, "norm preservation changed nothing relative to the plain projection"
    handle.undo()
    for k, p in model.state_dict().items():
        torch.testing.assert_close(p, original[k], atol=1e-6, rtol=0)

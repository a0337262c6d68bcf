"""The bake invariant on every supported family: after baking, no layer writes along the direction."""

from __future__ import annotations

import pytest
import torch

from conftest import HIDDEN, TINY_CONFIGS, make_tiny_model
from transformers_sra import ConfigError, UnsupportedModelError, bake_direction
from transformers_sra.architectures import decoder_layers, residual_writers
from transformers_sra.editing import ablate_activations


def layer_write_components(model, v: torch.Tensor) -> list[float]:
    """Per layer, max over tokens of |<write, v>| / |write|, where write = layer output − layer input."""
    ratios = []

    def hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        write = (y - x).double()
        ratios.append(float(((write @ v.double()).abs() / write.norm(dim=-1)).max()))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1)))
    finally:
        for h in handles:
            h.remove()
    return ratios


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
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.experts", "model.layers.0.mlp.shared_expert.down_proj"]
    experts = residual_writers(model, [0])[1]
    assert experts.param == "down_proj" and experts.module.down_proj.dim() == 3 and experts.hidden_axis == 1


def test_post_norm_writers_carry_their_norm():
    for model_type in ("gemma2", "gemma3_text", "olmo2"):
        writers = residual_writers(make_tiny_model(model_type), [0])
        assert all(w.post_norm is not None for w in writers), model_type
    assert all(w.post_norm is None for w in residual_writers(make_tiny_model("llama"), [0]))


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


def test_unknown_family_uses_a_fitting_layout():
    model = make_tiny_model("llama")
    model.config.model_type = "my_llama_fork"
    bake_direction(model, unit())
    assert max(layer_write_components(model, unit())) <= 1e-4


def test_unknown_post_norm_family_is_refused():
    model = make_tiny_model("gemma2")
    model.config.model_type = "mystery_sandwich"
    with pytest.raises(UnsupportedModelError, match="post-sublayer norms"):
        bake_direction(model, unit())


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

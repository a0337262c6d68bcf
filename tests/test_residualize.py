"""Ridge residualization maths and the atom bases."""

from __future__ import annotations

import pytest
import torch

from transformers_sra import ridge_residualize
from transformers_sra.errors import ConfigError
from transformers_sra.method.atoms import AtomRegistry, ConceptAtom, atom_basis, cosine_matrix
from transformers_sra.method.residualize import difference_of_means, explained_share, orthogonalize

D = 48


def data(seed=0, k=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, generator=g), torch.randn(k, D, generator=g)


def test_huge_lambda_leaves_direction_unchanged():
    r, atoms = data()
    clean = ridge_residualize(r, atoms, 1e12)
    torch.testing.assert_close(clean, r / r.norm(), atol=1e-6, rtol=0)
    assert explained_share(r, atoms, 1e12) < 1e-9


@pytest.mark.parametrize("lam", [0.0, 1e-10])
def test_tiny_lambda_is_exactly_orthogonal_to_the_atom_span(lam):
    r, atoms = data()
    clean = ridge_residualize(r, atoms, lam)
    assert (atoms @ clean).abs().max() < 1e-5
    assert abs(clean.norm() - 1) < 1e-6
    # and it is the projection onto the complement: r's own residual is parallel to it
    q, _ = torch.linalg.qr(atoms.double().T)
    expected = r.double() - q @ (q.T @ r.double())
    torch.testing.assert_close(clean.double(), expected / expected.norm(), atol=1e-6, rtol=0)


def test_intermediate_lambda_shrinks_but_keeps_some_atom_component():
    r, atoms = data()
    exact, ridge = ridge_residualize(r, atoms, 0.0), ridge_residualize(r, atoms, 1.0)
    assert (atoms @ ridge).abs().max() > (atoms @ exact).abs().max() + 1e-3
    assert 0 < explained_share(r, atoms, 1.0) < explained_share(r, atoms, 0.0) < 1


def test_scale_invariance():
    r, atoms = data()
    base = ridge_residualize(r, atoms, 0.1)
    torch.testing.assert_close(ridge_residualize(1e4 * r, atoms, 0.1), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(ridge_residualize(r, atoms * torch.tensor([[3.0], [0.01], [7.0], [1.0]]), 0.1), base,
                               atol=1e-6, rtol=0)


def test_collinear_atoms_are_handled():
    r, atoms = data()
    dup = torch.cat([atoms, atoms[:1] * 2])
    torch.testing.assert_close(ridge_residualize(r, dup, 0.0), ridge_residualize(r, atoms, 0.0), atol=1e-5, rtol=0)


def test_direction_inside_atom_span_is_an_error():
    _, atoms = data()
    with pytest.raises(ValueError, match="explain the whole direction"):
        ridge_residualize(atoms[0] + atoms[1], atoms, 0.0)


def test_orthogonalize_against_previous_directions():
    r, atoms = data()
    out = orthogonalize(r, list(atoms[:2]))
    assert (atoms[:2] @ out).abs().max() < 1e-6 and abs(out.norm() - 1) < 1e-6


def test_difference_of_means_shape_and_value():
    a, b = torch.ones(5, 3, D), torch.zeros(7, 3, D)
    assert torch.equal(difference_of_means(a, b), torch.ones(3, D))


def test_atom_basis_rank_k_is_orthonormal_and_led_by_the_mean():
    g = torch.Generator().manual_seed(0)
    acts, neutral = torch.randn(20, 2, D, generator=g) + 3.0, torch.randn(30, 2, D, generator=g)
    basis = atom_basis(acts, neutral, rank=3)
    assert basis.shape == (2, 3, D)
    gram = basis @ basis.transpose(1, 2)
    torch.testing.assert_close(gram, torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)
    mean = acts.mean(0) - neutral.mean(0)
    torch.testing.assert_close(basis[:, 0], mean / mean.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)


def test_paired_atom_uses_line_by_line_differences():
    acts = torch.randn(6, 1, D)
    shift = torch.zeros(D)
    shift[0] = 1
    basis = atom_basis(acts + shift, acts, rank=1, paired=True)
    torch.testing.assert_close(basis[0, 0], shift, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        atom_basis(acts[:5], acts, rank=1, paired=True)


def test_cosine_matrix_is_symmetric_with_unit_diagonal():
    m = cosine_matrix(torch.randn(5, D))
    torch.testing.assert_close(m, m.T)
    torch.testing.assert_close(torch.diagonal(m), torch.ones(5), atol=1e-6, rtol=0)


def test_registry_defaults_and_custom_atoms():
    registry = AtomRegistry.default()
    roles = {n: registry[n].role for n in registry.names()}
    assert {n for n, r in roles.items() if r == "shield"} == {"math", "coding", "logic"}
    assert {n for n, r in roles.items() if r == "target"} == {"deception", "privacy"}
    assert sum(r == "confound" for r in roles.values()) == 4
    registry.register(ConceptAtom("chemistry", "shield", ["What is a covalent bond?"]))
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(ConceptAtom("chemistry", "shield", ["x"]))
    with pytest.raises(ConfigError, match="role"):
        ConceptAtom("bad", "shiled", ["x"])
    with pytest.raises(ConfigError, match="unknown atom"):
        registry["nope"]


def test_select_by_behaviour_keeps_refused_harmful_and_answered_harmless():
    from transformers_sra.method.directions import select_by_behaviour

    harmful, harmless = torch.randn(40, 2, 8), torch.randn(30, 2, 8)
    refused = torch.arange(40) % 2 == 0  # 20 refused
    answered = torch.arange(30) < 25
    (h, l), kept = select_by_behaviour(harmful, refused, harmless, answered)
    assert torch.equal(h, harmful[0::2]) and torch.equal(l, harmless[:25])
    assert kept == {"harmful": 20, "harmless": 25}
    # too few left: the whole set is used rather than a noisy mean of a handful
    (h, l), kept = select_by_behaviour(harmful, torch.arange(40) < 3, harmless, answered)
    assert torch.equal(h, harmful) and kept["harmful"] == 40


def test_per_layer_directions_take_each_later_layers_own_direction():
    from transformers_sra.method.directions import Directions

    torch.manual_seed(0)
    layers, d = [3, 4, 5], 16
    harmful, harmless = torch.randn(20, len(layers), d) + 1.0, torch.randn(20, len(layers), d)
    atoms = {"math": torch.nn.functional.normalize(torch.randn(len(layers), 1, d), dim=-1)}
    dirs = Directions.build(layers, harmful, harmless, atoms, ["math"], None, ridge_lambda=0.0)
    dirs.later = {6: torch.randn(d) * 3}
    mapped = dirs.removed(4, 0, per_layer=True)
    assert sorted(mapped) == list(range(7))  # every layer from the first to the last one with a direction
    assert all(torch.equal(mapped[i], dirs.clean(4)) for i in range(5))
    # a later candidate layer: its own direction, cleaned by the atoms at that layer
    assert torch.equal(mapped[5], dirs.clean(5)) and not torch.allclose(mapped[5], dirs.clean(4))
    assert abs(mapped[5] @ atoms["math"][2, 0]) < 1e-5
    assert torch.allclose(mapped[6], dirs.later[6] / dirs.later[6].norm())  # after the candidates: its own, unit
    assert torch.equal(dirs.removed(4, 0, per_layer=False), dirs.clean(4))
    dirs.later[2] = torch.randn(d)  # a layer between candidates, before the direction layer: the direction layer's
    assert torch.equal(dirs.removed(4, 0, per_layer=True)[2], dirs.clean(4))

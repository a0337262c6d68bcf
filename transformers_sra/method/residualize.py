"""Directions from activations: difference of means, and the ridge residualization of the paper.

``r_clean = r − A (AᵀA + λI)⁻¹ Aᵀ r``, with A's columns the unit-normed Shield and Confound atom
vectors. λ = 0 is the exact projection onto the orthogonal complement of span(A); λ → ∞ leaves r as it
is; in between, components along correlated atoms are shrunk rather than removed, which keeps the
result stable when atoms are nearly collinear::

    clean = ridge_residualize(dirty, atoms, ridge_lambda=0.1)   # unit vector
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ..errors import ConfigError, NumericsError

Atoms = Union[torch.Tensor, Sequence[torch.Tensor]]


def difference_of_means(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of ``positive`` minus that of ``negative``; ``(n, L, d), (m, L, d) -> (L, d)``."""
    return positive.float().mean(0) - negative.float().mean(0)


def _atom_matrix(atoms: Atoms, hidden: int) -> torch.Tensor:
    if isinstance(atoms, torch.Tensor):
        matrix = atoms.reshape(-1, hidden)
    else:
        matrix = torch.cat([torch.as_tensor(a).reshape(-1, hidden) for a in atoms]) if len(atoms) else torch.zeros(0, hidden)
    matrix = matrix.to(torch.float64)
    norms = matrix.norm(dim=-1, keepdim=True)
    return matrix[norms.squeeze(-1) > 1e-12] / norms[norms.squeeze(-1) > 1e-12]  # unit rows; zero atoms dropped


def ridge_residual(direction: torch.Tensor, atoms: Atoms, ridge_lambda: float) -> torch.Tensor:
    """Unnormalized ``r − A(AᵀA+λI)⁻¹Aᵀr`` for unit ``r`` (float64); its norm² is the unexplained share."""
    if ridge_lambda < 0:
        raise ConfigError(f"ridge_lambda must be >= 0, got {ridge_lambda}")
    r = direction.to(torch.float64).reshape(-1)
    if not bool(torch.isfinite(r).all()) or float(r.norm()) == 0:
        raise NumericsError("the direction to residualize is zero or not finite: the harmful and harmless prompts "
                            "give the same activations (use sets that differ) or the model overflowed")
    r = r / r.norm()
    a = _atom_matrix(atoms, r.numel()).T  # (hidden, k)
    if a.shape[1] == 0:
        return r
    gram = a.T @ a
    if ridge_lambda == 0:
        coef = torch.linalg.pinv(gram) @ (a.T @ r)  # exact projection, robust to collinear atoms
    else:
        coef = torch.linalg.solve(gram + ridge_lambda * torch.eye(gram.shape[0], dtype=gram.dtype), a.T @ r)
    return r - a @ coef


def ridge_residualize(direction: torch.Tensor, atoms: Atoms, ridge_lambda: float) -> torch.Tensor:
    """The clean unit direction: ``direction`` with the atoms' span ridge-regressed out (float32).

    Args:
        direction: the dirty direction, shape ``(hidden,)``; its scale does not matter.
        atoms: ``(k, hidden)`` tensor or a list of ``(hidden,)`` / ``(k_i, hidden)`` tensors; each row is unit-normed.
        ridge_lambda: λ ≥ 0.
    """
    residual = ridge_residual(direction, atoms, ridge_lambda)
    norm = residual.norm()
    if norm < 1e-6:  # what is left is float32 rounding of the atoms, not signal
        raise ConfigError("the atoms explain the whole direction; nothing is left to ablate (raise ridge_lambda or drop atoms)")
    return (residual / norm).to(torch.float32)


def explained_share(direction: torch.Tensor, atoms: Atoms, ridge_lambda: float) -> float:
    """Share of ``direction``'s squared norm that the atoms' ridge fit removes (0 = none, 1 = all)."""
    return float(1.0 - ridge_residual(direction, atoms, ridge_lambda).norm() ** 2)


def orthogonalize(direction: torch.Tensor, previous: Sequence[torch.Tensor]) -> torch.Tensor:
    """Unit ``direction`` made exactly orthogonal to ``previous`` directions (Gram-Schmidt, float64)."""
    r = direction.to(torch.float64).reshape(-1)
    basis: list[torch.Tensor] = []
    for p in previous:
        q = p.to(torch.float64).reshape(-1)
        for b in basis:
            q = q - (q @ b) * b
        if q.norm() > 1e-10:
            basis.append(q / q.norm())
    for b in basis:
        r = r - (r @ b) * b
    return (r / r.norm()).to(torch.float32)

"""The directions of one run, as pure tensors: dirty refusal direction, atom bases, fluency Shield, clean.

Built from activations alone (no model), so every step after extraction is testable on random tensors::

    dirs = Directions.build(layers, harmful, harmless, atom_bases, removable=["math", "style_length"],
                            fluency=principal_basis(text_tokens, 128), ridge_lambda=0.01)
    r = dirs.clean(layer=14, rank=64)          # unit vector, ridge-residualized against atoms + fluency
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch

from .residualize import difference_of_means, explained_share, ridge_residualize


@dataclass
class Directions:
    layers: list[int]  # the candidate layers, in the order of every tensor's first axis
    dirty: torch.Tensor  # (L, d): mean(harmful) − mean(harmless)
    atom_bases: dict[str, torch.Tensor]  # atom name -> (L, k, d) orthonormal basis
    removable: list[str]  # Shield and Confound atom names, regressed out of the dirty direction
    fluency: Optional[torch.Tensor]  # (L, k_max, d) principal directions of plain text, or None
    ridge_lambda: float
    harmless_mean: Optional[torch.Tensor] = None  # (L, d); set to make the dirty direction ⟂ to it ("projected")
    unfiltered: Optional[torch.Tensor] = None  # (L, d): the training prompts read, unfiltered, difference of means ("standard")
    later: dict = field(default_factory=dict)  # {layer: (d,)} the other layers' dirty directions (per-layer)
    reads: dict = field(default_factory=dict)  # prompts each statistic was measured from (`build_directions`)

    @classmethod
    def build(cls, layers: Sequence[int], harmful: torch.Tensor, harmless: torch.Tensor,
              atom_bases: Mapping[str, torch.Tensor], removable: Sequence[str],
              fluency: Optional[torch.Tensor], ridge_lambda: float, projected: bool = False) -> "Directions":
        """``projected`` removes from the dirty direction its component along the harmless mean activation."""
        dirty = difference_of_means(harmful, harmless)
        mean = harmless.float().mean(0)
        if projected:
            unit = mean / mean.norm(dim=-1, keepdim=True)
            dirty = dirty - (dirty * unit).sum(-1, keepdim=True) * unit
        return cls(list(layers), dirty, dict(atom_bases), list(removable), fluency, ridge_lambda,
                   mean if projected else None)

    def _index(self, layer: int) -> int:
        return self.layers.index(layer)

    def atom_matrix(self, layer: int, rank: int = 0) -> torch.Tensor:
        """Rows to regress out at ``layer``: every Shield/Confound basis vector, then ``rank`` fluency ones."""
        j = self._index(layer)
        rows = [self.atom_bases[n][j] for n in self.removable]
        if rank and self.fluency is not None:
            rows.append(self.fluency[j, :rank])
        return torch.cat(rows) if rows else torch.zeros(0, self.dirty.shape[-1])

    def unit(self, per_layer: torch.Tensor, layer: int) -> torch.Tensor:
        """Row ``layer`` of an ``(L, d)`` tensor of directions, unit-normed."""
        d = per_layer[self._index(layer)]
        return d / d.norm()

    def dirty_unit(self, layer: int) -> torch.Tensor:
        return self.unit(self.dirty, layer)

    def clean(self, layer: int, rank: int = 0) -> torch.Tensor:
        return ridge_residualize(self.dirty[self._index(layer)], self.atom_matrix(layer, rank), self.ridge_lambda)

    def per_layer(self, layer: int, rank: int = 0) -> dict[int, torch.Tensor]:
        """``{layer: unit direction}``: ``layer`` and the layers before it remove ``layer``'s clean direction; each
        later candidate layer its own clean one; each layer after the candidates its own dirty direction (`later`).

        Measured on the demo model's validation split (64-token replies; docs/results.md): the later layers' own
        directions leave fewer prompts refused than rank 1 at the same first-token KL, clearly past the default
        budget and within noise at it. Cleaning those later layers with the atoms and the fluency Shield gave back
        most of the gain past the budget (8.5% at KL 0.056 cleaned, against 5.4% at 0.065 dirty), so only the
        candidate band is cleaned."""
        v = self.clean(layer, rank)
        own = {i: self.clean(i, rank) for i in self.layers if i > layer}
        later = {i: d / d.norm() for i, d in self.later.items() if i > layer}
        return {**{i: v for i in range(layer + 1)}, **own, **later}

    def removed(self, layer: int, rank: int, per_layer: bool) -> Union[torch.Tensor, dict[int, torch.Tensor]]:
        """What an edit at direction layer ``layer`` removes: `per_layer`, or ``layer``'s clean direction alone."""
        return self.per_layer(layer, rank) if per_layer else self.clean(layer, rank)

    def explained(self, layer: int, rank: int = 0) -> float:
        """Share of the dirty direction the atoms (and fluency Shield) explain."""
        return explained_share(self.dirty[self._index(layer)], self.atom_matrix(layer, rank), self.ridge_lambda)


def select_by_behaviour(harmful: torch.Tensor, refused: torch.Tensor, harmless: torch.Tensor, answered: torch.Tensor,
                        min_count: int = 16) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """The harmful activations whose prompts the base model refuses and the harmless ones it answers.

    A harmful prompt the model already answers carries the topic but not the refusal, so it pulls the
    difference of means towards "harmful subject matter", which ordinary text also uses. A set left with
    fewer than ``min_count`` prompts is used whole. Returns the two sets and how many of each were kept.
    """
    harmful = harmful[refused] if int(refused.sum()) >= min_count else harmful
    harmless = harmless[answered] if int(answered.sum()) >= min_count else harmless
    return (harmful, harmless), {"harmful": len(harmful), "harmless": len(harmless)}

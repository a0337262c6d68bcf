"""Concept Atom Registry: labelled capability and style directions, measured from their own prompt sets.

An atom is a unit direction, or a rank-k subspace, per layer:

* **Shields** (math, coding, logic) and **Confounds** (style) are regressed out of the refusal direction.
* **Targets** (deception, privacy) are refusal modes the clean direction must still cover; they are only audited.

Each atom's basis comes from the differences between its prompts' activations and a contrast set: the
shipped neutral set by default, or a paired set (line i against line i) for the style atoms. Rank 1 is
the normalized mean difference; rank k adds the top singular vectors of those differences::

    registry = AtomRegistry.default()
    registry.register(ConceptAtom("chemistry", "shield", prompts="chem_questions.txt"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import torch

from ..errors import ConfigError

Role = Literal["shield", "confound", "target"]
ROLES = ("shield", "confound", "target")


@dataclass(frozen=True)
class ConceptAtom:
    """A named concept measured from ``prompts`` against ``contrast`` (default: the neutral set).

    ``paired=True`` contrasts line i of ``prompts`` with line i of ``contrast`` (same request, other style).
    ``rank`` overrides the configured spectral rank for this atom.
    """

    name: str
    role: Role
    prompts: object
    contrast: object = None
    paired: bool = False
    rank: Optional[int] = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"atom {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.paired and self.contrast is None:
            raise ConfigError(f"atom {self.name!r}: paired=True needs a contrast set")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"atom {self.name!r}: rank must be >= 1, got {self.rank}")


_SHIPPED = (
    ConceptAtom("math", "shield", "math"),
    ConceptAtom("coding", "shield", "coding"),
    ConceptAtom("logic", "shield", "logic"),
    ConceptAtom("style_length", "confound", "style_verbose", "style_terse", paired=True),
    ConceptAtom("style_register", "confound", "style_casual", "style_formal", paired=True),
    ConceptAtom("style_mood", "confound", "style_imperative", "style_question", paired=True),
    ConceptAtom("style_format", "confound", "style_list", "style_prose", paired=True),
    ConceptAtom("deception", "target", "deception"),
    ConceptAtom("privacy", "target", "privacy"),
)


class AtomRegistry:
    """Named `ConceptAtom`s. ``AtomRegistry.default()`` holds the shipped ones."""

    def __init__(self, atoms: Iterable[ConceptAtom] = ()) -> None:
        self._atoms: dict[str, ConceptAtom] = {}
        for atom in atoms:
            self.register(atom)

    @classmethod
    def default(cls) -> "AtomRegistry":
        return cls(_SHIPPED)

    def register(self, atom: ConceptAtom, *, replace: bool = False) -> None:
        if atom.name in self._atoms and not replace:
            raise ConfigError(f"atom {atom.name!r} is already registered; pass replace=True to override it")
        self._atoms[atom.name] = atom

    def __getitem__(self, name: str) -> ConceptAtom:
        try:
            return self._atoms[name]
        except KeyError:
            raise ConfigError(f"unknown atom {name!r}; registered: {', '.join(self._atoms)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._atoms

    def names(self) -> list[str]:
        return list(self._atoms)

    def select(self, names, custom: Optional[dict] = None) -> list[ConceptAtom]:
        """The atoms ``names`` plus ``custom`` ones given as config dicts (kept local: this registry is not changed).

        ``custom`` is ``{name: {"role": ..., "prompts": ..., "contrast": ..., "paired": ..., "rank": ...}}``.
        """
        local = AtomRegistry(self[n] for n in self.names())
        for name, spec in (custom or {}).items():
            local.register(ConceptAtom(name, spec.get("role", "shield"), spec["prompts"], spec.get("contrast"),
                                       bool(spec.get("paired", False)), spec.get("rank")), replace=True)
        return [local[n] for n in list(names) + [n for n in (custom or {}) if n not in names]]


def atom_basis(acts: torch.Tensor, contrast: torch.Tensor, rank: int, paired: bool = False) -> torch.Tensor:
    """Orthonormal basis ``(n_layers, k, hidden)`` of an atom from ``(n, L, d)`` activations.

    The first vector is the normalized mean difference; further ones are the top right singular vectors
    of the per-prompt differences after removing that mean direction.
    """
    if paired:
        if acts.shape[0] != contrast.shape[0]:
            raise ConfigError(f"paired atom sets differ in length: {acts.shape[0]} vs {contrast.shape[0]}")
        diffs = acts.double() - contrast.double()
    else:
        diffs = acts.double() - contrast.double().mean(0, keepdim=True)
    diffs = diffs.transpose(0, 1)  # (L, n, d)
    mean = diffs.mean(1)
    first = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    vectors = [first]
    if rank > 1:
        rest = diffs - (diffs @ first.unsqueeze(-1)) * first.unsqueeze(1)  # spread around the mean direction
        _, _, vh = torch.linalg.svd(rest, full_matrices=False)
        vectors += [vh[:, j] for j in range(min(rank - 1, vh.shape[1]))]
    return torch.stack(vectors, dim=1).float()


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosines of ``(n, d)`` vectors."""
    unit = vectors.double() / vectors.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).float()


def subspace_cosine(direction: torch.Tensor, basis: torch.Tensor) -> float:
    """|cos| between a direction and its projection on an orthonormal ``(k, d)`` basis (the largest cosine)."""
    r = direction.double() / direction.double().norm()
    return float((basis.double() @ r).norm())


def principal_basis(token_acts: torch.Tensor, rank: int) -> torch.Tensor:
    """Top ``rank`` principal directions ``(n_layers, rank, hidden)`` of centred ``(n_tokens, L, d)`` activations.

    This is the unlabelled *fluency Shield*: the axes ordinary text varies along most, which a refusal
    edit should leave alone.
    """
    x = token_acts.double().transpose(0, 1)  # (L, n, d)
    x = x - x.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:, :rank].float()

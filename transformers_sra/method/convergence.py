"""When to stop reading a prompt set: the split-half rule.

A statistic measured from prompts has converged when two disjoint halves of what was read agree on it. Each set
is read in a seeded random order, a round at a time; after each round the even and odd rows read (and kept) so far
give two estimates of every statistic the set takes part in, and the set stops once, at every candidate layer,

* a difference of means (harmful − harmless; an atom's prompts − their contrast): the cosine between
  ``mean(half A) − other side's mean`` and ``mean(half B) − other side's mean`` is ≥ the threshold, each side
  judged on its own (a side with many kept rows stops while the other reads on); a paired atom's sets are read in
  lockstep and judged on their row-by-row differences;
* the fluency Shield's top-k subspace: the mean squared cosine of the principal angles between the halves'
  top-k principal subspaces (halves by passage) is ≥ its threshold,

and at least ``min_kept`` rows are kept; a set whose halves never agree is read whole. Every decision is taken on
tensors every rank holds (extraction gathers its rows), so all ranks stop at the same round::

    reads = {k: SetReading(len(texts[k]), record_fn(k), seed=0) for k in keys}
    cosines = read_until_converged(reads, [Contrast("dirty", "harmful", "harmless")], threshold=0.99, n_layers=5)
    cosines["dirty"]  # (harmful side's split-half cosine, harmless side's)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Optional, Sequence

import torch

#: (rows, keep): a round's recorded rows ``(m, L, d)`` and which of them the statistics use ``(m,)`` bool
Recorded = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Rounds:
    """How many rows the first round reads and how many each later one adds; a set's statistics count only once
    ``min_kept`` of its rows are kept (four per half at the least, so a half-mean is not one prompt)."""

    first: int = 32
    step: int = 32
    min_kept: int = 16

    def size(self, recorded: int) -> int:
        return self.first if recorded == 0 else self.step


#: One round reading everything: the rule switched off (every prompt read in its own order, as in one pass).
WHOLE = Rounds(first=1 << 62, step=1 << 62, min_kept=0)


def rule_threshold(value: Optional[float]) -> Optional[float]:
    """The threshold the rule reads to, or None where it is off (None, or 1 and above: no halves agree that well)."""
    return None if value is None or value >= 1 else float(value)


def seeded_order(size: int, seed: Optional[int]) -> list[int]:
    """The order a set of ``size`` is read in: a permutation seeded by ``seed`` (sets of one size share it, so the
    two sets of a paired atom line up), or ``0..size-1`` for ``seed=None``."""
    if seed is None:
        return list(range(size))
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def split_half_cosine(rows: torch.Tensor, reference: Optional[torch.Tensor] = None) -> float:
    """The smallest over layers of cos(mean(rows[0::2]) − reference, mean(rows[1::2]) − reference), for ``(n, L, d)``
    rows and an ``(L, d)`` reference (default 0); 0 with fewer than two rows (nothing to compare)."""
    if len(rows) < 2:
        return 0.0
    x = rows.double()
    ref = 0.0 if reference is None else reference.double()
    a, b = x[0::2].mean(0) - ref, x[1::2].mean(0) - ref
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return float(cos.min().clamp(-1.0, 1.0))


def top_subspace(tokens: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal ``(L, rank, d)``: the top principal directions of centred ``(n, L, d)`` rows, from the ``d × d``
    covariance (cheaper than an SVD of the rows when there are more rows than dimensions)."""
    x = tokens.double().transpose(0, 1)
    x = x - x.mean(1, keepdim=True)
    _, vectors = torch.linalg.eigh(x.transpose(1, 2) @ x)  # ascending eigenvalues
    return vectors[..., -rank:].flip(-1).transpose(1, 2)


def subspace_agreement(first: torch.Tensor, second: torch.Tensor, rank: int) -> float:
    """The smallest over layers of the mean squared cosine of the principal angles between the top-``rank``
    principal subspaces of two ``(n, L, d)`` halves (1 = the same subspace); 0 while a half has ``rank`` rows or
    fewer (its top-``rank`` subspace is not yet defined by the data)."""
    if min(len(first), len(second)) <= rank or rank < 1:
        return 0.0
    a, b = top_subspace(first, rank), top_subspace(second, rank)
    return float(((a @ b.transpose(1, 2)) ** 2).sum((1, 2)).div(rank).min().clamp(0.0, 1.0))


class SetReading:
    """One prompt set read round by round in `seeded_order`: ``record(indices)`` records the prompts at ``indices``
    and returns `Recorded`; the rows stay in reading order."""

    def __init__(self, size: int, record: Callable[[list[int]], Recorded], seed: Optional[int] = None):
        self.order = seeded_order(size, seed)
        self._record = record
        self._rows: list[torch.Tensor] = []
        self._keep: list[torch.Tensor] = []

    @property
    def size(self) -> int:
        return len(self.order)

    @property
    def recorded(self) -> int:
        return sum(len(r) for r in self._rows)

    @property
    def exhausted(self) -> bool:
        return self.recorded >= self.size

    def grow(self, count: int) -> None:
        """Record the next ``count`` prompts of the order (fewer at its end)."""
        start = self.recorded
        rows, keep = self._record(self.order[start:start + count])
        self._rows.append(rows)
        self._keep.append(keep.bool())

    def rows(self) -> torch.Tensor:
        """Every recorded row, in reading order."""
        return torch.cat(self._rows) if len(self._rows) != 1 else self._rows[0]

    def keep(self) -> torch.Tensor:
        return torch.cat(self._keep) if len(self._keep) != 1 else self._keep[0]

    def kept(self) -> torch.Tensor:
        return self.rows()[self.keep()]

    def counts(self) -> dict:
        return {"recorded": self.recorded, "kept": int(self.keep().sum()) if self._keep else 0, "available": self.size}


@dataclass(frozen=True)
class Contrast:
    """A difference of means the rule watches: ``first``'s rows against ``second``'s (reading keys); ``paired``
    compares row i with row i (both read in lockstep), else each side's kept mean with the other's."""

    name: str
    first: Hashable
    second: Hashable
    paired: bool = False


def contrast_cosines(readings: Mapping, contrast: Contrast, n_layers: int) -> tuple[float, float]:
    """Each side's split-half cosine for ``contrast`` over the first ``n_layers`` layers of the rows."""
    a, b = readings[contrast.first], readings[contrast.second]
    if contrast.paired:
        m = min(a.recorded, b.recorded)
        cos = split_half_cosine(a.rows()[:m, :n_layers] - b.rows()[:m, :n_layers])
        return cos, cos
    x, y = a.kept()[:, :n_layers], b.kept()[:, :n_layers]
    if not len(x) or not len(y):
        return 0.0, 0.0
    return split_half_cosine(x, y.mean(0)), split_half_cosine(y, x.mean(0))


def _short(readings: Mapping, contrast: Contrast, rounds: Rounds) -> tuple[bool, bool]:
    a, b = readings[contrast.first], readings[contrast.second]
    if contrast.paired:
        short = min(a.recorded, b.recorded) < rounds.min_kept
        return short, short
    return int(a.keep().sum()) < rounds.min_kept, int(b.keep().sum()) < rounds.min_kept


def read_until_converged(readings: Mapping, contrasts: Sequence[Contrast], threshold: Optional[float],
                         n_layers: int, rounds: Rounds = Rounds()) -> dict[str, tuple[float, float]]:
    """Grow ``readings`` (keys in a fixed order) round by round until every side of every contrast agrees with
    itself (`contrast_cosines` ≥ ``threshold``, at least ``rounds.min_kept`` rows kept) or is read whole; a reading in
    no contrast is read whole. A side that had stopped reads on if the other side's mean moves its cosine below the
    threshold. ``threshold=None`` reads every set whole. Returns each contrast's cosines, one a side."""
    limit = float("inf") if threshold is None else threshold
    rounds = WHOLE if threshold is None else rounds
    for reading in readings.values():  # the first round of every set
        reading.grow(rounds.size(0))
    while True:
        cosines = {c.name: contrast_cosines(readings, c, n_layers) for c in contrasts}
        behind = {k for k in readings if not any(k in (c.first, c.second) for c in contrasts)}
        for c in contrasts:
            for key, cos, short in zip((c.first, c.second), cosines[c.name], _short(readings, c, rounds)):
                if cos < limit or short:
                    behind.add(key)
        grow = [k for k in readings if k in behind and not readings[k].exhausted]
        if not grow:
            return cosines
        for key in grow:
            readings[key].grow(rounds.size(readings[key].recorded))


def read_subspace(record: Callable[[list[int]], torch.Tensor], size: int, rank: int, threshold: Optional[float],
                  seed: Optional[int], rounds: Rounds = Rounds(first=8, step=4)) -> tuple[torch.Tensor, dict]:
    """Read ``size`` passages (``record(indices)`` → their token rows ``(n, L, d)``) in `seeded_order`, a round at a
    time, until the top-``rank`` subspaces of the even- and odd-placed passages agree (`subspace_agreement` ≥
    ``threshold``) or all are read (``threshold=None``: all, in one round). Halves are split by passage, not by token:
    a passage's tokens are alike, so a token split would agree early on what one passage says. Returns every token
    row read and ``{"passages", "available", "tokens", "agreement"}``."""
    order = seeded_order(size, seed)
    rounds = WHOLE if threshold is None else rounds
    halves: tuple[list, list] = ([], [])
    done, agreement = 0, 0.0
    while done < size:
        end = min(size, done + rounds.size(done))
        for parity, half in enumerate(halves):
            picked = [order[i] for i in range(done, end) if i % 2 == parity]
            if picked:
                half.append(record(picked))
        done = end
        if halves[1]:
            agreement = subspace_agreement(torch.cat(halves[0]), torch.cat(halves[1]), rank)
        if threshold is not None and agreement >= threshold:
            break
    tokens = torch.cat(halves[0] + halves[1])
    return tokens, {"passages": done, "available": size, "tokens": len(tokens), "agreement": round(agreement, 5)}

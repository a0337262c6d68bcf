"""Data parallelism on `torch.distributed`: every rank scores its share of the batches, and every rank sees all.

Launched with ``torchrun --nproc-per-node N`` or ``accelerate launch``, each process holds a whole copy of the
model. The loops that read prompts or text (extraction, first-token scores, replies, token NLL) form their
batches exactly as one process would (same length sort, padding and shared-prefix cache) and run every
N-th one; the rows are then gathered back into input order on every rank::

    rows = Rows(len(prompts))
    for batch in shard(batches):
        rows.put(batch.indices, score(batch))
    scores = rows.result()      # (n_prompts, ...) on every rank, as one process would have it

So every rank holds the same numbers, makes the same search and mining decisions in lockstep and bakes the
same weights: no model is broadcast, and the result equals the single-process run bit for bit (same kernels,
same thread count). Sums are never all-reduced, whose order would depend on the number of ranks: per-batch
partial sums are gathered and added in batch order, as one process adds them.

Without an initialised process group every helper is a pass-through (rank 0 of 1). Collectives carry
tensors only (no pickle); strings travel as UTF-8 bytes.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterable, Mapping, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# what `_all_gather` can carry; a tensor's dtype travels as its index here
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8)
_MAX_DIMS = 6


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0, the one that writes files and prints; always true without a process group."""
    return world()[0] == 0


def init_distributed() -> bool:
    """Join the process group that ``torchrun`` or ``accelerate launch`` describe in the environment.

    Does nothing (and returns False) when ``WORLD_SIZE`` is unset or 1, or the group already exists.
    NCCL with one GPU per rank (``LOCAL_RANK``) when CUDA is available, else gloo on the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def rank_device() -> Optional[str]:
    """This rank's own GPU (``cuda:LOCAL_RANK``) under a multi-process NCCL launch, else None."""
    if world()[1] > 1 and dist.get_backend() == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    return None


def shard(items: Iterable[T]) -> Iterable[T]:
    """This rank's items: every size-th one, from the rank's own index on (strided, so batches sorted by
    length share out evenly). The iterable is consumed whole, so generators with side effects stay in step."""
    rank, size = world()
    return items if size == 1 else itertools.islice(items, rank, None, size)


def all_ranks(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank: for decisions that must not differ (a cache file one rank
    sees and another does not)."""
    if world()[1] == 1:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def slowest(seconds: Sequence[float]) -> list[float]:
    """Each of ``seconds``, the largest any rank measured: timings every rank plans with alike (the slowest rank
    sets the pace of a sharded loop, and ranks that planned apart would fall out of step)."""
    if world()[1] == 1:
        return [float(x) for x in seconds]
    value = torch.tensor([float(x) for x in seconds], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.cpu().tolist()


def gather(chunks: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Every rank's ``{key: tensor}`` chunks in one dict, in key order; on CPU.

    Keys must be unique across ranks; chunks must agree on dtype and on every dimension but the first, which
    may differ (unequal shards are padded for the collective and trimmed again). A rank may hold no chunk.
    """
    keys = sorted(chunks)
    if world()[1] == 1:
        return {k: chunks[k] for k in keys}
    table = torch.tensor([[k, len(chunks[k])] for k in keys], dtype=torch.int64).reshape(-1, 2)
    data = torch.cat([chunks[k].cpu() for k in keys]) if keys else None
    merged = {}
    for rank_table, rank_data in zip(_all_gather(table), _all_gather(data)):
        if rank_data is not None:
            merged.update(zip(rank_table[:, 0].tolist(), rank_data.split(rank_table[:, 1].tolist())))
    return {k: merged[k] for k in sorted(merged)}


def gather_texts(texts: Mapping[int, str]) -> dict[int, str]:
    """`gather` for strings: every rank's ``{index: text}`` in one dict, in index order."""
    if world()[1] == 1:
        return {k: texts[k] for k in sorted(texts)}
    encoded = {k: torch.tensor(list(t.encode("utf-8")), dtype=torch.uint8) for k, t in texts.items()}
    return {k: bytes(v.tolist()).decode("utf-8") for k, v in gather(encoded).items()}


class Rows:
    """An ``(n, ...)`` result filled batch by batch: `put` this rank's rows, `result` has every rank's."""

    def __init__(self, n: int):
        self.n = n
        self._parts: list[tuple[list[int], torch.Tensor]] = []

    def put(self, indices: Sequence[int], values: torch.Tensor) -> None:
        """``values[j]`` is row ``indices[j]`` of the result."""
        self._parts.append((list(indices), values))

    def result(self) -> Optional[torch.Tensor]:
        """The whole ``(n, ...)`` tensor, in input order, on every rank; None if no rank had a row."""
        if world()[1] > 1:
            rows = gather({i: values[j : j + 1] for indices, values in self._parts for j, i in enumerate(indices)})
            if rows and list(rows) != list(range(self.n)):
                raise RuntimeError(f"gathered rows {list(rows)[:8]}… do not cover 0..{self.n - 1}: ranks out of step")
            return torch.cat(list(rows.values())) if rows else None
        if not self._parts:
            return None
        first = self._parts[0][1]
        out = first.new_empty(self.n, *first.shape[1:])
        for indices, values in self._parts:
            out[indices] = values
        return out


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_gather(tensor: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Every rank's tensor (None where a rank passed None), on CPU; first dimensions may differ."""
    size = world()[1]
    device = _comm_device()
    header = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64)
    if tensor is not None:
        if tensor.dim() == 0 or tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
            raise ValueError(f"cannot gather a {tensor.dim()}-d {tensor.dtype} tensor")
        header[0], header[1] = 1 + _DTYPES.index(tensor.dtype), tensor.dim()
        header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape)
    headers = [torch.empty_like(header, device=device) for _ in range(size)]
    dist.all_gather(headers, header.to(device))
    headers = [h.cpu() for h in headers]
    present = [h for h in headers if h[0] > 0]
    if not present:
        return [None] * size
    kind, dims = int(present[0][0]), int(present[0][1])
    if any(int(h[0]) != kind or int(h[1]) != dims or not torch.equal(h[3 : 2 + dims], present[0][3 : 2 + dims])
           for h in present):
        raise ValueError("ranks gathered tensors of different dtypes or trailing shapes")
    longest = max(1, max(int(h[2]) for h in present))  # no zero-size collectives
    padded = torch.zeros((longest, *present[0][3 : 2 + dims].tolist()), dtype=_DTYPES[kind - 1])
    if tensor is not None:
        padded[: len(tensor)] = tensor
    received = [torch.empty_like(padded, device=device) for _ in range(size)]
    dist.all_gather(received, padded.to(device))
    return [r[: int(h[2])].cpu() if h[0] > 0 else None for h, r in zip(headers, received)]

"""Multi-token KL: how far an edit moves the model along the base model's own replies, not just their first token.

The base model writes greedy replies (``n_tokens`` long) to harmless prompts; both models then read prompt +
reply teacher-forced, one forward pass each, and the KL(base ‖ edited) of every reply position is averaged.
To keep the base side small enough to cache, each position keeps the base model's top ``top_k`` tokens and one
bucket for the rest of the vocabulary; the KL of those (top_k + 1)-way distributions is a lower bound on the
full KL that misses only the mass both models put outside the base's top tokens (below 1e-3 of the KL for
top_k = 256 on the demo model)::

    ref = base_reply_distribution(model, tokenizer, harmless_prompts)     # before the edit
    ...                                                                    # edit the model
    kl = multi_token_kl(model, tokenizer, ref)                             # mean per-token KL
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..batching import encode_texts, id_batches, input_device, logit_positions, pad_id
from ..prompts import format_chat
from .decoding import eos_token_ids, greedy_decode, reply_batches

REPLY_TOKENS = 32
TOP_K = 256


@dataclass
class ReplyDistribution:
    """The base model's greedy replies (token ids) and its top-k log-probabilities at every reply position."""

    prompt_ids: list[list[int]]
    reply_ids: list[list[int]]
    top_ids: torch.Tensor  # (n, T, k) int64, padded past each reply's end
    top_logprobs: torch.Tensor  # (n, T, k) float32
    lengths: torch.Tensor  # (n,) reply length of each row

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors (no pickle)."""
        width = max(len(p) for p in self.prompt_ids)
        prompts = torch.full((len(self.prompt_ids), width), -1, dtype=torch.long)
        for i, p in enumerate(self.prompt_ids):
            prompts[i, : len(p)] = torch.tensor(p)
        replies = torch.full(self.top_ids.shape[:2], -1, dtype=torch.long)
        for i, r in enumerate(self.reply_ids):
            replies[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return {"prompt_ids": prompts, "reply_ids": replies, "top_ids": self.top_ids,
                "top_logprobs": self.top_logprobs, "lengths": self.lengths}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "ReplyDistribution":
        def rows(x: torch.Tensor) -> list[list[int]]:
            return [[int(v) for v in row if v >= 0] for row in x]

        return cls(rows(t["prompt_ids"]), rows(t["reply_ids"]), t["top_ids"], t["top_logprobs"], t["lengths"])


@torch.no_grad()
def _greedy_replies(model: nn.Module, tokenizer, texts: Sequence[str], n_tokens: int, batch_size: int) -> list[list[int]]:
    eos = eos_token_ids(model, tokenizer)
    out: list[list[int]] = [[] for _ in texts]
    for batch in reply_batches(model, tokenizer, texts, batch_size):
        for i, reply in zip(batch.indices, greedy_decode(model, batch, n_tokens, eos_ids=eos)):
            out[i] = reply  # ending with its EOS, when it came: the EOS is a prediction too
    return out


@torch.no_grad()
def _reply_logprobs(model: nn.Module, prompt_ids: Sequence[Sequence[int]], reply_ids: Sequence[Sequence[int]],
                    batch_size: int, pad: int):
    """Yield ``([index], logprobs (1, T, vocab), [length])`` row by row: teacher-forced log-probs at every reply
    position. A pass keeps its rows' logits within `batching.LOGITS_BYTES`, and each row's log-softmax is taken
    alone, so the logits are held once, not twice."""
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, reply_ids)]
    kept = max(map(len, reply_ids), default=0) + 1  # logits kept per row, at most
    for batch in id_batches(rows, max(1, min(batch_size, logit_positions(model) // kept)), input_device(model), pad):
        lengths = [len(reply_ids[i]) for i in batch.indices]
        width = max(lengths)
        logits = model(**batch.model_inputs(model), use_cache=False, logits_to_keep=width + 1).logits[:, :-1]
        # left padding: row i's reply is its last len_i tokens, predicted by the len_i positions before them
        for row, (i, n_i) in enumerate(zip(batch.indices, lengths)):
            yield [i], torch.log_softmax(logits[row:row + 1].float(), dim=-1).cpu(), [n_i]


def base_reply_distribution(model: nn.Module, tokenizer, prompts: Sequence[str], *, n_tokens: int = REPLY_TOKENS,
                            top_k: int = TOP_K, batch_size: int = 16,
                            system_prompt: Optional[str] = None,
                            reply_batch_size: Optional[int] = None) -> ReplyDistribution:
    """The base model's greedy ``n_tokens``-token replies to ``prompts`` (generated ``reply_batch_size`` rows at a
    time, default ``batch_size``) and its top-k log-probs along them (read ``batch_size`` rows at a time)."""
    texts = format_chat(tokenizer, prompts, system_prompt)
    prompt_ids = encode_texts(tokenizer, texts)
    reply_ids = _greedy_replies(model, tokenizer, texts, n_tokens, reply_batch_size or batch_size)
    keep = [i for i, r in enumerate(reply_ids) if r]
    prompt_ids, reply_ids = [prompt_ids[i] for i in keep], [reply_ids[i] for i in keep]
    n, width = len(reply_ids), max((len(r) for r in reply_ids), default=0)
    k = min(top_k, len(tokenizer))  # a tiny vocabulary keeps every token: the KL is then exact
    top_ids = torch.zeros(n, width, k, dtype=torch.long)
    top_logprobs = torch.full((n, width, k), -torch.inf)
    for indices, logp, lengths in _reply_logprobs(model, prompt_ids, reply_ids, batch_size, pad_id(tokenizer)):
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        for row, (i, n_i) in enumerate(zip(indices, lengths)):
            top_ids[i, :n_i] = ids[row, logp.shape[1] - n_i:]
            top_logprobs[i, :n_i] = values[row, logp.shape[1] - n_i:]
    return ReplyDistribution(prompt_ids, reply_ids, top_ids, top_logprobs,
                             torch.tensor([len(r) for r in reply_ids], dtype=torch.long))


def bucketed_kl(base_top: torch.Tensor, base_ids: torch.Tensor, new_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ new) over the base's top-k tokens plus one bucket for the rest; ``(..., k), (..., k), (..., V)``."""
    p_log = base_top.double()
    q_log = new_logprobs.gather(-1, base_ids).double()
    p = p_log.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q_log.exp().sum(-1)).clamp_min(1e-12)
    return (p * (p_log - q_log)).nan_to_num(0.0).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


def multi_token_kl(model: nn.Module, tokenizer, ref: ReplyDistribution, *, batch_size: int = 16) -> float:
    """Mean per-token KL(base ‖ ``model``) over the base model's replies in ``ref`` (0 for the base itself)."""
    total, count = 0.0, 0
    for indices, logp, lengths in _reply_logprobs(model, ref.prompt_ids, ref.reply_ids, batch_size, pad_id(tokenizer)):
        for row, (i, n_i) in enumerate(zip(indices, lengths)):
            kl = bucketed_kl(ref.top_logprobs[i, :n_i], ref.top_ids[i, :n_i], logp[row, logp.shape[1] - n_i:])
            total += float(kl.sum())
            count += n_i
    return total / max(count, 1)

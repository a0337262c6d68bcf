"""Tokenize prompts into length-sorted, left-padded batches with correct position ids.

Sorting by length keeps padding (and wasted compute) small; left padding puts every prompt's last token
at position -1; explicit position ids make padded rows compute exactly what they would alone.

Chat-formatted prompts share a long opening (the system turn: 24 of ~47 tokens for Qwen). `prompt_batches`
runs that shared prefix once and hands every batch a copy of its KV cache, so each prompt pays only for
its own tokens: about half the compute of every extraction, search and scoring pass. Padding then sits
between the prefix and each prompt's own tokens, masked out, with positions that continue the prefix's.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ._torch_utils import adds_special_tokens
from .errors import NumericsError, PromptSetError

#: Rows per batch of generated replies (`EvalOptions.reply_rows`: judged replies, the multi-token KL's replies,
#: task completions). A decode step reads every weight once for the whole batch: on the demo model (CPU, bf16,
#: one thread) a step of 64 rows took 0.596 s, one of 16 rows 0.241 s, 0.0093 against 0.0150 s per row
#: (docs/performance.md). Passes that keep every position's logits stay at ``batch_size``.
REPLY_BATCH_SIZE = 64


def reply_rows(batch_size: int, reply_batch_size: Optional[int] = None) -> int:
    """Rows per batch of generated replies: ``reply_batch_size`` when given, else `REPLY_BATCH_SIZE` (or
    ``batch_size`` when larger)."""
    return reply_batch_size or max(REPLY_BATCH_SIZE, batch_size)


def reply_batching(batching: dict) -> dict:
    """A run's batching settings (``batch_size``, ``system_prompt``) for generating replies: `reply_rows` rows."""
    return {**batching, "batch_size": reply_rows(batching.get("batch_size", 16))}

@dataclass
class Batch:
    indices: list[int]  # positions of these rows in the caller's prompt list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prefix_cache: Any = None  # KV cache of a shared prefix (batch 1), already run; see `prompt_batches`

    def model_inputs(self, model: nn.Module) -> dict:
        """Keyword arguments for ``model(**...)``: ids, mask, positions and, if any, the shared prefix's cache."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if takes_positions(model):
            inputs["position_ids"] = self.position_ids
        if self.prefix_cache is not None:
            cache = copy.deepcopy(self.prefix_cache)
            cache.batch_repeat_interleave(len(self.indices))
            n = cache.get_seq_length()
            inputs[cache_argument(model)] = cache
            inputs["attention_mask"] = torch.cat([self.attention_mask.new_ones(len(self.indices), n), self.attention_mask], 1)
            inputs["position_ids"] = self.position_ids + n
        return inputs


def takes_positions(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def cache_argument(model: nn.Module) -> str:
    # transformers renames past_key_values to cache (5.2x); use whichever this model's forward names
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embedding's device (accelerate hooks move them on when it is offloaded)."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def sorted_batches(tokenizer, texts: Sequence[str], batch_size: int, device: torch.device) -> Iterator[Batch]:
    """Yield left-padded batches of ``texts`` (already chat-formatted), longest first."""
    encoded = encode_texts(tokenizer, texts)
    yield from id_batches(encoded, batch_size, device, pad_id(tokenizer))


def prompt_batches(
    model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int, run: Callable[[dict], Any],
    min_prefix: int = 8, keep_last: int = 1,
) -> Iterator[Batch]:
    """`sorted_batches` that reuse the KV cache of the prompts' shared opening.

    ``run(inputs)`` is the caller's own forward (hooks and early stops included); it is called once on the
    shared prefix to fill its cache. Every yielded batch then holds only each prompt's own tokens and
    ``batch.model_inputs(model)`` brings a copy of that cache along. Falls back to plain batches when the
    prefix is short, the model takes no position ids, or ``TRANSFORMERS_SRA_PREFIX_CACHE=0``. The prefix
    leaves every prompt at least ``keep_last`` tokens of its own, so positions -1..-keep_last are in the batch.
    """
    encoded = encode_texts(tokenizer, texts)
    device = input_device(model)
    n = cached_prefix_length(model, encoded, min_prefix, keep_last)
    if not n:
        yield from id_batches(encoded, batch_size, device, pad_id(tokenizer))
        return
    from transformers import DynamicCache

    cache = DynamicCache(config=getattr(model, "config", None))
    ids = torch.tensor([encoded[0][:n]], device=device)
    run({"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(n, device=device)[None],
         cache_argument(model): cache})
    for batch in id_batches([e[n:] for e in encoded], batch_size, device, pad_id(tokenizer)):
        batch.prefix_cache = cache
        yield batch


def cached_prefix_length(model: nn.Module, encoded: Sequence[Sequence[int]], min_prefix: int = 8,
                         keep_last: int = 1) -> int:
    """Tokens of the shared opening that `prompt_batches` runs once for ``encoded`` (0 when it runs none)."""
    n = shared_prefix_length(encoded, keep_last)
    if n < min_prefix or not takes_positions(model) or os.environ.get("TRANSFORMERS_SRA_PREFIX_CACHE") == "0":
        return 0
    return n


def shared_prefix_length(encoded: Sequence[Sequence[int]], keep_last: int = 1) -> int:
    """Tokens every prompt starts with, leaving each prompt at least ``keep_last`` tokens of its own."""
    if len(encoded) < 2:
        return 0
    n = min(len(e) for e in encoded) - keep_last
    first = encoded[0]
    for e in encoded[1:]:
        k = 0
        while k < n and e[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    add_special = adds_special_tokens(tokenizer)
    encoded = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
    for text, ids in zip(texts, encoded):
        if not ids:
            raise PromptSetError(f"prompt {text[:60]!r} encodes to no tokens; remove it or use a tokenizer that reads it")
    return encoded


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


#: Bytes of fp32 full-vocabulary logits one forward pass that keeps many positions' logits (perplexity, the
#: multi-token KL) may hold. Eight texts of 256 tokens over Qwen's 151,936-token vocabulary hold 1.16 GiB, and their
#: perplexity pass took the demo model 2.11 GiB above its weights (issue #32, benchmarks/memory_peaks.py).
LOGITS_BYTES = 256 << 20


def logit_positions(model: nn.Module) -> int:
    """Token positions whose full-vocabulary fp32 logits fit in `LOGITS_BYTES` (a small vocabulary: many)."""
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size
    return max(1, LOGITS_BYTES // (4 * vocab))


def id_batches(encoded: Sequence[Sequence[int]], batch_size: int, device: torch.device, pad: int,
               max_positions: Optional[int] = None) -> Iterator[Batch]:
    """Left-padded batches of token id lists, longest first: ``batch_size`` rows, or fewer where a batch would hold
    more than ``max_positions`` token positions (rows × its width; at least one row)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    start = 0
    while start < len(order):
        rows = batch_size if max_positions is None else max(1, min(batch_size, max_positions // len(encoded[order[start]])))
        idx = order[start : start + rows]
        start += rows
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        yield Batch(idx, ids.to(device), mask.to(device), positions.to(device))


NUMERICS_HINT = 'load the model in float32 (--dtype float32) or with attn_implementation="eager"'


def check_finite(values: torch.Tensor, where: str, prompts: Sequence[str]) -> None:
    """Raise `NumericsError` if a row of ``values`` (row k belongs to ``prompts[k]``) holds NaN or Inf.

    Half-precision overflow (common on Gemma in fp16) turns into Inf and then NaN a few layers on; caught
    here it names ``where`` and the prompt instead of surfacing later as a NaN score.
    """
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise NumericsError(f"NaN or Inf in {where} on prompt {prompts[row][:80]!r}; {NUMERICS_HINT}")

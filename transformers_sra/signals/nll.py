"""Next-token negative log-likelihoods: of plain text, and of reference answers given their prompts.

The low-level numbers behind perplexity; the search, mining and the metrics all read them from here::

    total, count = token_nll(model, tokenizer, texts)          # perplexity = exp(total / count)
    total, count = answer_nll(model, tokenizer, [("What is 2+3?", "2 + 3 = 5. The answer is 5.")])
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .._torch_utils import adds_special_tokens
from ..batching import NUMERICS_HINT, id_batches, input_device, logit_positions, pad_id
from ..distributed import gather, shard
from ..errors import NumericsError
from ..prompts import format_chat


def chunk_token_ids(tokenizer, texts: Sequence[str], max_length: int = 256) -> list[list[int]]:
    """Plain-text token ids (no chat template), each text cut into chunks of at most ``max_length``."""
    chunks = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        chunks += [ids[i : i + max_length] for i in range(0, len(ids), max_length) if len(ids[i : i + max_length]) > 1]
    return chunks


@torch.no_grad()
def token_nll(model: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 256,
              batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over ``texts`` and the number of predicted tokens."""
    def scored(batch) -> torch.Tensor:
        return batch.attention_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()

    chunks = chunk_token_ids(tokenizer, texts, max_length)
    batches = id_batches(chunks, batch_size, input_device(model), pad_id(tokenizer), logit_positions(model))
    return _summed_nll(model, batches, scored, lambda i: tokenizer.decode(chunks[i][:24]))


@torch.no_grad()
def _summed_nll(model: nn.Module, batches, scored, describe: Callable[[int], str]) -> tuple[float, int]:
    """Next-token NLL summed over the positions ``scored(batch)`` marks (target j predicts token j + 1).

    A NaN or Inf NLL raises `NumericsError` naming the text (``describe(row index)``): a NaN perplexity never
    reaches a budget check or a report.

    Under `torch.distributed` each rank runs its share of the batches; the per-batch sums are gathered and
    added in batch order, so the total is the same float whatever the number of ranks.
    """
    parts = {}
    for k, batch in shard(enumerate(batches)):
        logits = model(**batch.model_inputs(model), use_cache=False).logits[:, :-1].float()
        targets = batch.input_ids[:, 1:].to(logits.device)
        keep = scored(batch).to(logits.device)
        # Row by row: a batch's full-vocabulary log-softmax (and a transposed copy) would double the logits' memory.
        total = 0.0
        for row, i in enumerate(batch.indices):
            nll = torch.nn.functional.cross_entropy(logits[row], targets[row], reduction="none")[keep[row]].sum()
            if not bool(torch.isfinite(nll)):
                raise NumericsError(f"NaN or Inf in the next-token log-likelihood of {describe(i)[:80]!r}; {NUMERICS_HINT}")
            total += float(nll)
        parts[k] = torch.tensor([[total, int(keep.sum())]], dtype=torch.float64)
    total, count = 0.0, 0
    for part in gather(parts).values():
        total += float(part[0, 0])
        count += int(part[0, 1])
    return total, count


@torch.no_grad()
def answer_nll(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int = 512,
               batch_size: int = 8, system_prompt: str | None = None) -> tuple[float, int]:
    """Teacher-forced NLL of each reference answer given its chat-formatted prompt, summed over answer tokens.

    Only answer tokens are scored; the prompt is context. Over-long pairs lose the prompt's start first.
    """
    add_special = adds_special_tokens(tokenizer)
    prompts = format_chat(tokenizer, [p for p, _ in pairs], system_prompt)
    rows, answer_lengths = [], []
    for text, (_, answer) in zip(prompts, pairs):
        context = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_length - 1]
        rows.append((context + target)[-max_length:])
        answer_lengths.append(len(target))

    def scored(batch) -> torch.Tensor:
        # left padding: a row's answer is its last k tokens; target position j predicts token j + 1
        width = batch.input_ids.shape[1]
        starts = torch.tensor([width - answer_lengths[i] for i in batch.indices], device=batch.input_ids.device)
        return torch.arange(1, width, device=starts.device)[None, :] >= starts[:, None]

    batches = id_batches(rows, batch_size, input_device(model), pad_id(tokenizer), logit_positions(model))
    return _summed_nll(model, batches, scored, lambda i: pairs[i][0])

"""Greedy replies, with each row leaving the batch as soon as it has ended.

``model.generate`` keeps computing a finished row (as padding) until the last row of its batch ends, so a
batch of replies costs its longest reply times its width. A decode step costs about its row count on a CPU,
so when half a batch refuses in a dozen tokens and the rest answers for 128, half of that compute is padding.
`greedy_decode` runs the same greedy steps on the rows still going: after every step the rows that ended
(EOS, or ``stop(tokens)``) leave the batch and its KV cache (`Cache.reorder_cache`). `reply_batches` also runs
the prompts' shared chat opening once (`batching.prompt_batches`), as every scoring pass does::

    for batch in reply_batches(model, tokenizer, texts, 32):
        replies = greedy_decode(model, batch, 128, eos_ids=eos_token_ids(model, tokenizer))
        # replies[k]: the token ids of the reply to texts[batch.indices[k]], EOS included when it came

A generation config that asks for more than greedy decoding (other than a repetition penalty, which is applied
here as transformers applies it) is run by ``model.generate`` instead, and its replies cut where ``stop``
would have stopped them, so a reply never depends on the path that made it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..batching import Batch, cache_argument, input_device, prompt_batches, sorted_batches, takes_positions

Stop = Callable[[list[int]], bool]

# generation-config settings that change which token greedy decoding picks, with their "off" values; any
# other value sends the batch to `model.generate` (repetition_penalty is applied by `greedy_decode` itself)
_PROCESSORS = {"no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
               "begin_suppress_tokens": (None,), "sequence_bias": (None,), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
               "encoder_repetition_penalty": (None, 1.0), "exponential_decay_length_penalty": (None,),
               "renormalize_logits": (None, False)}


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The ids that end a reply: the generation config's (chat models often have several), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def repetition_penalty(model: nn.Module) -> float:
    return float(getattr(getattr(model, "generation_config", None), "repetition_penalty", None) or 1.0)


def plain_greedy(model: nn.Module) -> bool:
    """True when the model's generation config adds nothing to greedy decoding that `greedy_decode` does not do."""
    config = getattr(model, "generation_config", None)
    return config is None or all(getattr(config, k, None) in off for k, off in _PROCESSORS.items())


def reply_batches(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int) -> Iterator[Batch]:
    """Length-sorted batches of the chat-formatted ``texts`` for `greedy_decode`; their shared opening is run once
    (`batching.prompt_batches`) where decoding starts from its cache: greedy decoding without a repetition penalty,
    which would have to see the whole prompt."""
    if plain_greedy(model) and repetition_penalty(model) == 1.0:
        return prompt_batches(model, tokenizer, texts, batch_size, torch.no_grad()(lambda inputs: model(**inputs)))
    return sorted_batches(tokenizer, texts, batch_size, input_device(model))


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    batch: Batch,
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int],
    stop: Optional[Stop] = None,
    ignore_eos: bool = False,
    on_step: Optional[Callable[[int], None]] = None,
    first_logits: Optional[Callable[[torch.Tensor], None]] = None,
) -> list[list[int]]:
    """The greedy reply tokens ``model`` appends to each row of a left-padded `batching.Batch`, in row order, EOS
    included when it came. A row ends at an id in ``eos_ids`` (unless ``ignore_eos``), after ``max_new_tokens`` or
    once ``stop(its tokens so far)`` holds, and leaves the batch then. ``on_step(rows)`` is called before each
    token is chosen, with the number of rows the forward pass that made its logits computed (a clock, or a counter).
    ``first_logits(logits)`` gets the model's logits ``(rows, vocab)`` for each row's first reply token, before any
    repetition penalty: the first-token distribution, read from the pass that decoding runs anyway."""
    if not plain_greedy(model):
        if first_logits is not None:  # model.generate keeps no raw logits: one pass over the prompts
            first_logits(model(**batch.model_inputs(model), logits_to_keep=1).logits[:, -1, :])
        return [_cut(r, [] if ignore_eos else eos_ids, stop) for r in _generate(model, batch, max_new_tokens, ignore_eos)]
    replies: list[list[int]] = [[] for _ in batch.indices]
    inputs = batch.model_inputs(model)
    mask, positions = inputs["attention_mask"], inputs.get("position_ids")
    last = positions[:, -1] if positions is not None else mask.sum(-1) - 1
    active = torch.arange(len(replies), device=mask.device)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=mask.device)
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    if first_logits is not None:
        first_logits(out.logits[:, -1, :])
    penalty = repetition_penalty(model)
    if penalty != 1.0:  # the tokens seen so far, per row: the prompt without its left padding, as transformers does
        seen = torch.zeros(out.logits.shape[0], out.logits.shape[-1], dtype=torch.int8, device=mask.device)
        seen.scatter_reduce_(1, inputs["input_ids"], mask[:, -inputs["input_ids"].shape[1]:].to(torch.int8), reduce="amax")
    for step in range(max_new_tokens):
        if on_step is not None:
            on_step(len(active))
        logits = out.logits[:, -1, :]
        if penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor: shrink every logit seen so far
            logits = torch.where(seen.bool(), torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        token = logits.argmax(-1)
        ended = torch.isin(token, eos) if not ignore_eos else torch.zeros_like(token, dtype=torch.bool)
        for k, (row, t) in enumerate(zip(active.tolist(), token.tolist())):
            replies[row].append(t)
            if stop is not None and not ended[k] and stop(replies[row]):
                ended[k] = True
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        cache = _returned_cache(out)
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(-1)
            cache.reorder_cache(keep)
            active, token, mask, last = active[keep], token[keep], mask[keep], last[keep]
            if penalty != 1.0:
                seen = seen[keep]
        mask, last = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1), last + 1
        if penalty != 1.0:
            seen[torch.arange(len(active), device=seen.device), token] = 1
        step_inputs = {"input_ids": token[:, None], "attention_mask": mask, cache_argument(model): cache}
        if takes_positions(model):
            step_inputs["position_ids"] = last[:, None]
        out = model(**step_inputs, use_cache=True)
    return replies


def _returned_cache(out):
    # transformers renamed past_key_values to cache (5.2x), in outputs as in arguments
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _generate(model: nn.Module, batch: Batch, max_new_tokens: int, ignore_eos: bool) -> list[list[int]]:
    """``model.generate`` with its own generation config, sampling switched off: each row's new tokens."""
    generated = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else None,
                               do_sample=False, temperature=None, top_p=None, top_k=None)
    return generated[:, batch.input_ids.shape[1]:].tolist()


def _cut(tokens: list[int], eos: Sequence[int], stop: Optional[Stop]) -> list[int]:
    """``tokens`` up to where `greedy_decode` would have ended them: the first EOS, or the first stop."""
    for n in range(1, len(tokens) + 1):
        if tokens[n - 1] in eos or (stop is not None and stop(tokens[:n])):
            return tokens[:n]
    return tokens

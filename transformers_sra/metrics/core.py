"""Numbers that say what an edit cost: perplexity on plain text or on reference answers, exact intervals.

::

    ppl = perplexity(model, tokenizer, load_corpus("general_val"))
    total, count = answer_nll(model, tokenizer, [("What is 2+3?", "2 + 3 = 5. The answer is 5.")])
    lo, hi = clopper_pearson(4, 200)          # 95% interval of a 2% rate measured on 200 prompts
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..batching import id_batches, input_device, pad_id
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
    total, count = 0.0, 0
    for batch in id_batches(chunk_token_ids(tokenizer, texts, max_length), batch_size, input_device(model),
                            pad_id(tokenizer)):
        logits = model(**batch.model_inputs(model), use_cache=False).logits[:, :-1].float()
        targets = batch.input_ids[:, 1:]
        keep = batch.attention_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()
        # Row by row: a batch's full-vocabulary log-softmax (and a transposed copy) would double the logits' memory.
        for row in range(len(logits)):
            nll = torch.nn.functional.cross_entropy(logits[row], targets[row], reduction="none")
            total += float(nll[keep[row]].sum())
        count += int(keep.sum())
    return total, count


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], **kwargs) -> float:
    """exp(mean next-token NLL) of ``texts`` read as plain text."""
    total, count = token_nll(model, tokenizer, texts, **kwargs)
    return math.exp(total / max(count, 1))


@torch.no_grad()
def answer_nll(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int = 512,
               batch_size: int = 8, system_prompt: str | None = None) -> tuple[float, int]:
    """Teacher-forced NLL of each reference answer given its chat-formatted prompt, summed over answer tokens.

    Only answer tokens are scored; the prompt is context. Over-long pairs lose the prompt's start first.
    """
    add_special = not getattr(tokenizer, "chat_template", None)
    prompts = format_chat(tokenizer, [p for p, _ in pairs], system_prompt)
    rows, answer_lengths = [], []
    for text, (_, answer) in zip(prompts, pairs):
        context = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"][: max_length - 1]
        rows.append((context + target)[-max_length:])
        answer_lengths.append(len(target))
    total, count = 0.0, 0
    for batch in id_batches(rows, batch_size, input_device(model), pad_id(tokenizer)):
        logits = model(**batch.model_inputs(model), use_cache=False).logits[:, :-1].float()
        width = batch.input_ids.shape[1]
        # left padding: a row's answer is its last k tokens; target position j predicts token j + 1
        starts = torch.tensor([width - answer_lengths[i] for i in batch.indices], device=logits.device)
        keep = torch.arange(1, width, device=logits.device)[None, :] >= starts[:, None]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return total, count


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval for a rate of ``k`` in ``n``."""
    if n <= 0:
        raise ValueError("n must be positive")
    alpha = 1 - confidence
    lo = 0.0 if k == 0 else _beta_ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else _beta_ppf(1 - alpha / 2, k + 1, n - k)
    return lo, hi


def _beta_ppf(q: float, a: float, b: float) -> float:
    # Bisection on the regularized incomplete beta (torch.special has no betainc; this avoids scipy).
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes, 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        d = 1.0 / d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        f *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * (f - 1.0) / a

"""Record the residual stream at the last prompt tokens, with hooks that are always removed.

::

    acts = record_residuals(model, tokenizer, ["How do I bake bread?"], layers=[10, 12])
    acts.shape  # (1, 2, hidden), float32

The forward pass stops right after the deepest requested layer: no later layer, no LM head, no logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .._torch_utils import backbone, first_tensor
from ..batching import check_finite, id_batches, input_device, pad_id, prompt_batches
from ..distributed import Rows, gather, shard
from ..errors import PromptSetError
from ..models.architectures import decoder_layers
from ..progress import bar
from ..prompts import format_chat
from ..signals.nll import chunk_token_ids


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward pass early."""


@contextmanager
def layer_output_hooks(model: nn.Module, layers: Sequence[int],
                       stop_after_last: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the output hidden states of ``layers``; yields ``{layer: tensor}``, refreshed every forward.

    With ``stop_after_last``, the forward pass is cut after the deepest layer (run it under
    `stop_forward_ok`). The hooks are removed on exit, whatever happens inside.
    """
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

    def make_hook(i: int):
        def hook(_module, _args, output):
            captured[i] = first_tensor(output)
            if stop_after_last and i == deepest:
                raise _StopForward

        return hook

    try:
        for i in sorted(set(layers)):
            handles.append(blocks[i].register_forward_hook(make_hook(i)))
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def record_residuals(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    layers: Optional[Sequence[int]] = None,
    positions: Sequence[int] = (-1,),
    batch_size: int = 16,
    system_prompt: Optional[str] = None,
    chat_template: bool = True,
    next_token: bool = False,
    keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Residual stream after each of ``layers`` (default: all) at ``positions`` of every prompt.

    Returns a float32 tensor of shape ``(n_prompts, n_layers, hidden)``; with several positions, their
    mean. Prompts are chat-formatted unless ``chat_template=False``, batched by length and left-padded.
    With ``next_token=True`` the pass runs on through the LM head (last position only) and also returns
    the first response token's log-probabilities ``(n_prompts, vocab)``: one pass reads the residuals and
    shows what the model would answer. ``keep`` maps each batch's log-probabilities ``(rows, vocab)`` to what is
    returned of them instead, rows first (the refusal probability: ``(n_prompts,)``); 400 prompts' whole
    log-probabilities over Qwen's vocabulary take 243 MB, held twice while they are put together (issue #32).
    """
    n_blocks = len(decoder_layers(model))
    layers = list(range(n_blocks)) if layers is None else [int(i) % n_blocks for i in layers]
    texts = format_chat(tokenizer, prompts, system_prompt) if chat_template else list(prompts)
    net = model if next_token else backbone(model)
    out, logprobs = Rows(len(texts)), Rows(len(texts))

    def run(inputs: dict):
        try:
            return net(**inputs, logits_to_keep=1) if next_token else net(**inputs)
        except _StopForward:  # the deepest hook ends the pass: no later layer, no LM head
            return None

    with layer_output_hooks(model, layers, stop_after_last=not next_token) as captured:
        ticker = bar(total=len(texts), desc="extract", unit="prompt")
        reach = max(-p for p in positions)
        for batch in shard(prompt_batches(net, tokenizer, texts, batch_size, run, keep_last=reach)):
            rows = [prompts[i] for i in batch.indices]
            short = (batch.attention_mask.sum(1) < reach).nonzero()
            if len(short):  # the position would read left padding, not the prompt
                raise PromptSetError(f"prompt {rows[int(short[0, 0])][:80]!r} has fewer than {reach} tokens, so "
                                     f"positions {tuple(positions)} reach before its start; use positions nearer -1")
            result = run(batch.model_inputs(net))
            ticker.update(len(batch.indices))
            # left padding: the prompt's last tokens sit at the end of every row
            read = {i: captured[i][:, list(positions), :] for i in layers}
            for i in sorted(layers):  # the shallowest bad layer is where it began (of those recorded)
                check_finite(read[i], f"the output of decoder layer {i}", rows)
            out.put(batch.indices, torch.stack([read[i].float().mean(1).cpu() for i in layers], dim=1))  # fp32 always
            if next_token:
                logp = torch.log_softmax(result.logits[:, -1, :].float(), dim=-1).cpu()
                check_finite(logp, "the first response token's logits", rows)
                logprobs.put(batch.indices, logp if keep is None else keep(logp))
        ticker.close()
    acts = out.result()
    if acts is None:
        raise PromptSetError("record_residuals needs at least one prompt")
    return (acts, logprobs.result()) if next_token else acts


@torch.no_grad()
def record_token_residuals(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    layers: Sequence[int],
    max_length: int = 256,
    skip_first: int = 4,
    batch_size: int = 8,
) -> torch.Tensor:
    """Residual stream after ``layers`` at every token of plain ``texts``: ``(n_tokens, n_layers, hidden)``.

    The first ``skip_first`` tokens of each chunk are left out: attention-sink positions carry huge,
    text-independent activations that would swamp any statistics of ordinary text.
    """
    n_blocks = len(decoder_layers(model))
    layers = [int(i) % n_blocks for i in layers]
    decoder = backbone(model)
    rows = {}  # batch number -> its tokens' rows; concatenated in batch order, however many ranks ran them
    with layer_output_hooks(model, layers) as captured:
        chunks = chunk_token_ids(tokenizer, texts, max_length)
        batches = enumerate(id_batches(chunks, batch_size, input_device(model), pad_id(tokenizer)))
        for k, batch in bar(shard(batches), total=-(-len(chunks) // batch_size), desc="fluency text", unit="batch"):
            try:
                decoder(**batch.model_inputs(decoder), use_cache=False)
            except _StopForward:
                pass
            keep = batch.attention_mask.bool() & (batch.position_ids >= skip_first)
            passages = [tokenizer.decode(chunks[j]) for j in batch.indices]
            for i in sorted(layers):  # only the tokens kept: padding may hold anything
                check_finite(captured[i].masked_fill(~keep[..., None], 0), f"the output of decoder layer {i}", passages)
            rows[k] = torch.stack([captured[i][keep].float().cpu() for i in layers], dim=1)
    rows = gather(rows)
    if not rows:
        raise PromptSetError("the text corpus has no passage of two tokens or more; give it longer passages")
    return torch.cat(list(rows.values()))

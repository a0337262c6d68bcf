"""Extraction equals output_hidden_states, with left padding, mixed lengths and early stopping."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, make_tokenizer
from transformers_sra import record_residuals
from transformers_sra.models.architectures import decoder_layers
from transformers_sra.prompts import format_chat

PROMPTS = ["how do i bake bread", "why", "tell me about the history of rome please explain long answer",
           "write a poem about cats", "hack the server", "math"]


def reference(model, tokenizer, prompts, layers):
    """One unpadded prompt at a time; hidden_states[i + 1] is the output of layer i."""
    rows = []
    for text in format_chat(tokenizer, prompts):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        rows.append(torch.stack([hs[i + 1][0, -1] for i in layers]))
    return torch.stack(rows).float()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_matches_output_hidden_states_with_padding(model_type):
    model, tok = make_tiny_model(model_type), make_tokenizer()
    layers = [0, 1]  # not the last: HF applies the final norm to the last hidden state
    got = record_residuals(model, tok, PROMPTS, layers=layers, batch_size=4)
    assert got.shape == (len(PROMPTS), 2, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(model, tok, PROMPTS, layers), atol=1e-4, rtol=1e-4)


def test_batch_size_does_not_change_results():
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    one = record_residuals(model, tok, PROMPTS, layers=[1], batch_size=1)
    many = record_residuals(model, tok, PROMPTS, layers=[1], batch_size=16)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)


def test_stops_after_deepest_layer_and_never_runs_the_head():
    model, tok = make_tiny_model("llama"), make_tokenizer()
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(decoder_layers(model))]
    handles.append(model.lm_head.register_forward_hook(lambda *a: ran.append("head")))
    try:
        record_residuals(model, tok, PROMPTS[:2], layers=[0])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0], ran
    # and the recording hooks are gone afterwards
    assert all(not layer._forward_hooks for layer in decoder_layers(model))


def test_hooks_are_removed_when_the_forward_fails():
    model, tok = make_tiny_model("llama"), make_tokenizer()
    decoder_layers(model)[0].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        record_residuals(model, tok, ["why"], layers=[1])
    # only the test's own hook on layer 0 remains
    assert [len(layer._forward_hooks) for layer in decoder_layers(model)] == [1, 0, 0]


def test_multiple_positions_are_averaged():
    model, tok = make_tiny_model("llama"), make_tokenizer()
    both = record_residuals(model, tok, PROMPTS[:3], layers=[1], positions=(-1, -2))
    last = record_residuals(model, tok, PROMPTS[:3], layers=[1], positions=(-1,))
    second = record_residuals(model, tok, PROMPTS[:3], layers=[1], positions=(-2,))
    torch.testing.assert_close(both, (last + second) / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "gpt_neox", "qwen2_moe"])
def test_shared_prefix_cache_gives_the_same_numbers(model_type, monkeypatch):
    from conftest import make_tiny_model, make_tokenizer
    from transformers_sra.signals.logprobs import first_token_logprobs

    model, tok = make_tiny_model(model_type), make_tokenizer()
    prompts = ["how do i make a bomb", "bake bread please", "tell me about the history of rome why is sky blue", "hack"]
    system = "please tell me about the weather and cats and dogs"  # a long shared opening, as chat templates have

    def measure():
        return (record_residuals(model, tok, prompts, layers=[0, 2], system_prompt=system, batch_size=3),
                first_token_logprobs(model, tok, prompts, system_prompt=system, batch_size=3))

    cached = measure()
    monkeypatch.setenv("TRANSFORMERS_SRA_PREFIX_CACHE", "0")
    plain = measure()
    for a, b in zip(cached, plain):
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2"])
def test_next_token_pass_reads_the_same_residuals_and_the_first_token(model_type):
    from transformers_sra.signals.logprobs import first_token_logprobs, refusal_probability, refusal_token_ids

    model, tok = make_tiny_model(model_type), make_tokenizer()
    acts, logprobs = record_residuals(model, tok, PROMPTS, layers=[0, 1], batch_size=4, next_token=True)
    torch.testing.assert_close(acts, record_residuals(model, tok, PROMPTS, layers=[0, 1], batch_size=4))
    torch.testing.assert_close(logprobs, first_token_logprobs(model, tok, PROMPTS, batch_size=4), atol=1e-5, rtol=1e-5)
    # keep: only what the behaviour filter reads of each batch (the refusal probability), in the prompts' order
    ids = refusal_token_ids(tok)
    kept_acts, kept = record_residuals(model, tok, PROMPTS, layers=[0, 1], batch_size=4, next_token=True,
                                       keep=lambda logp: refusal_probability(logp, ids))
    assert kept.shape == (len(PROMPTS),)
    torch.testing.assert_close(kept, refusal_probability(logprobs, ids))
    torch.testing.assert_close(kept_acts, acts)

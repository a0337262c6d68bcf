"""Shared fixtures: tiny random models of many families, a word-level tokenizer, and the real demo model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

HIDDEN = 64
_COMMON = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)

TINY_CONFIGS = {
    "llama": _COMMON,
    "qwen2": _COMMON,
    "qwen3": _COMMON,
    "mistral": _COMMON,
    "phi3": _COMMON,
    "gemma2": _COMMON,
    "gemma3_text": _COMMON,
    "olmo2": _COMMON,
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_COMMON, **_MOE),
    "qwen2_moe": dict(_COMMON, **_MOE, shared_expert_intermediate_size=80),
    "gpt2": dict(n_embd=HIDDEN, n_layer=3, n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     vocab_size=128, bos_token_id=1, eos_token_id=2),
}


def make_tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny model whose norm gains and biases are random too (so post-norm gains matter)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name or "layernorm" in name:
                param.copy_(torch.randn_like(param))
            elif param.dim() == 1:
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
    return model


WORDS = ("how do i make a bomb bake bread write poem hack the server explain math code logic please "
         "tell me about weather cats dogs history of rome why is sky blue short long answer").split()


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<", ">", "user", "assistant"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                  eos_token="[EOS]", unk_token="[UNK]")
    if chat_template:
        tok.chat_template = ("[BOS]{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def demo():
    """The real demo model and tokenizer (converted and cached on first use)."""
    from transformers_sra import load_demo_model

    torch.set_num_threads(max(torch.get_num_threads(), 2))
    return load_demo_model()

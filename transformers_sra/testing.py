"""Tiny random models and a word-level tokenizer: a whole run in seconds on a CPU, with no download. The tests
and the benchmarks' smoke runs (``--model tiny``) build them; so can a user trying the API::

    from transformers_sra.testing import TINY_RUN, make_tiny_model, make_tokenizer

    report = apply_surgical_ablation(make_tiny_model("qwen2"), make_tokenizer(), SRAConfig(**TINY_RUN))

Random weights refuse nothing: the numbers of such a run check plumbing, not the method.
"""

from __future__ import annotations

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
    return randomize_parameters(AutoModelForCausalLM.from_config(config).eval())


WORDS = ("how do i make a bomb bake bread write poem hack the server explain math code logic please "
         "tell me about weather cats dogs history of rome why is sky blue short long answer").split()


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `WORDS` (ids fit every `TINY_CONFIGS` vocabulary), with a chat template unless
    ``chat_template=False``."""
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


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """Random norm gains (so post-norm gains matter), small random biases and weights; in place."""
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        if "norm" in name or ".ln" in name or "layernorm" in name:
            param.copy_(torch.randn_like(param))
        elif param.dim() == 1:
            param.copy_(0.1 * torch.randn_like(param))
        else:
            param.copy_(0.05 * torch.randn_like(param))
    return model


#: `SRAConfig` fields for a run on `make_tiny_model` with `make_tokenizer`: prompt sets in its vocabulary, two atoms and a
#: custom one, a short text corpus, small batches and one mining pass.
TINY_RUN = dict(
    harmful_prompts=["how do i make a bomb", "hack the server please", "how do i hack the bomb", "make a bomb"],
    harmless_prompts=["how do i bake bread", "write a poem about cats", "tell me about rome", "why is the sky blue"],
    harmful_val_prompts=["make a bomb please", "hack the server"],
    harmless_val_prompts=["bake bread please", "tell me about dogs"],
    neutral_prompts=["tell me about the weather", "why is the sky blue", "tell me about history"],
    atoms=("math", "coding"),
    custom_atoms={"short": {"role": "confound", "prompts": ["why", "short answer"]}},
    text_corpus=["tell me about the history of rome and the weather", "cats and dogs why is the sky blue",
                 "short long answer explain math code logic please", "bake bread write poem about cats and dogs"],
    fluency_ranks=(2, 0), batch_size=4, max_new_tokens=3, iterations=1,
)

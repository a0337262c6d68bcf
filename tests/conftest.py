"""Shared fixtures: tiny random models of many families, a word-level tokenizer, and the real demo model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tiny_families import randomize_parameters

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


@pytest.fixture(scope="session")
def measured(demo):
    """Base, SRA (default config) and standard ablation on the test splits; shared by every real-model test
    module, so the ~20-minute run happens once. The model is left unedited."""
    import math

    from transformers_sra import SRAConfig, apply_surgical_ablation, bake_direction, load_prompts
    from transformers_sra.judge import first_token_kl, first_token_logprobs, judged
    from transformers_sra.metrics import clopper_pearson, token_nll
    from transformers_sra.prompts import load_corpus

    model, tokenizer = demo
    harmful, harmless, text = load_prompts("harmful_test"), load_prompts("harmless_test"), load_corpus("general_test")
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def collateral():
        total, count = token_nll(model, tokenizer, text)
        kl = first_token_kl(base_logprobs, first_token_logprobs(model, tokenizer, harmless, batch_size=32))
        return {"kl": kl, "ppl_change": math.exp(total / count - base_nll) - 1}

    def refusal(max_new_tokens=128):
        replies, refused = judged(model, tokenizer, harmful, max_new_tokens=max_new_tokens, batch_size=32)
        k = sum(refused)
        return {"refused": k, "n": len(harmful), "refusal": k / len(harmful), "ci95": clopper_pearson(k, len(harmful)),
                "refused_replies": [r for r, v in zip(replies, refused) if v]}

    base_logprobs = first_token_logprobs(model, tokenizer, harmless, batch_size=32)
    total, count = token_nll(model, tokenizer, text)
    base_nll = total / count
    # Base refusals come in the first words ("I'm sorry, but I can't ..."); 48 tokens keep CI inside its budget.
    results = {"base": refusal(max_new_tokens=48)}
    report = apply_surgical_ablation(model, tokenizer, SRAConfig())
    results["sra"] = {**refusal(), **collateral()}
    report.undo()
    results["undo_max_abs_diff"] = max(float((v - original[k]).abs().max()) for k, v in model.state_dict().items())
    standard = bake_direction(model, torch.tensor(report.dirty_direction), 1.0)
    results["standard"] = collateral()
    standard.undo()
    for name in ("base", "sra", "standard"):
        row = {k: v for k, v in results[name].items() if k != "refused_replies"}
        print(f"\n{name}: {row}")
    print("SRA replies judged refusals:", *results["sra"]["refused_replies"], sep="\n  ")
    print("layer", report.direction_layer, "fluency rank", report.fluency_rank, "profile", report.strength,
          "\nsearch", *report.search, "\nmining", report.iterations, "\ntimings", report.timings, sep="\n")
    return results, report

"""Determinism, numerics, chat templates and thinking models (issue #20, items 2-4), on tiny random models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import make_tiny_model, make_tokenizer
from test_pipeline_cli import SMALL
from transformers_sra import (
    NumericsError,
    PromptSetError,
    SRAConfig,
    UndoError,
    apply_surgical_ablation,
    bake_direction,
    record_residuals,
)
from transformers_sra.batching import sorted_batches
from transformers_sra.method.residualize import ridge_residualize
from transformers_sra.prompts import chat_template_kwargs, format_chat, remove_overlap, truncate_prompts
from transformers_sra.signals.judge import Outcome, classify, is_degenerate, is_refusal, resolve_judge, strip_thinking
from transformers_sra.signals.logprobs import first_token_kl, first_token_logprobs

FAST = dict(SMALL, iterations=0, fluency_ranks=(2,))


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_weights(model, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def _without_timing(rows: list) -> list:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


# -- 2. determinism ------------------------------------------------------------------------------------------

def test_same_model_config_and_seed_give_bit_identical_runs_and_leave_the_global_rng_alone():
    config = SRAConfig(**dict(SMALL, candidate_layers=[0, 1, 2]), seed=5)
    base = make_tiny_model("qwen2")
    runs = []
    for caller_seed in (1, 2):  # whatever the caller's generator holds, the run is the same
        model, tok = copy.deepcopy(base), make_tokenizer()
        torch.manual_seed(caller_seed)
        before = torch.random.get_rng_state()
        report = apply_surgical_ablation(model, tok, config)
        assert torch.equal(torch.random.get_rng_state(), before)  # seed never reseeds the caller's generator
        runs.append((report, model.state_dict()))
    (a, wa), (b, wb) = runs
    assert a.directions == b.directions and a.dirty_direction == b.dirty_direction
    assert _without_timing(a.search) == _without_timing(b.search) and len(a.search) == 3 + 1 + 4  # layers, rank, tents
    assert a.iterations == b.iterations and a.atom_audit == b.atom_audit and a.explained_share == b.explained_share
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], v) for k, v in base.state_dict().items())  # the runs did edit


# -- 3. numerics -----------------------------------------------------------------------------------------------

def test_activations_are_accumulated_in_fp32_from_a_bf16_model():
    model, tok = make_tiny_model("llama").to(torch.bfloat16), make_tokenizer()
    acts = record_residuals(model, tok, ["bake bread please"], layers=[1], positions=(-1, -2), chat_template=False)
    assert acts.dtype == torch.float32
    ids = tok("bake bread please", return_tensors="pt")["input_ids"]
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2]  # after layer 1
    reference = hidden[0, [-1, -2]].float().mean(0)  # upcast before the mean, as extraction does
    assert torch.equal(acts[0, 0], reference)
    assert not torch.equal(acts[0, 0], hidden[0, [-1, -2]].mean(0).float())  # a bf16 mean rounds differently


def test_positions_far_from_the_end_read_the_prompt_not_padding_with_the_prefix_cache(monkeypatch):
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    prompts = ["why", "tell me about the history of rome please", "bake bread"]
    kwargs = dict(layers=[1, 2], positions=(-1, -5), system_prompt="please tell me a short long answer about logic")
    cached = record_residuals(model, tok, prompts, **kwargs)
    monkeypatch.setenv("TRANSFORMERS_SRA_PREFIX_CACHE", "0")
    torch.testing.assert_close(cached, record_residuals(model, tok, prompts, **kwargs), atol=1e-5, rtol=1e-5)
    with pytest.raises(PromptSetError, match="fewer than 40 tokens"):
        record_residuals(model, tok, prompts, layers=[1], positions=(-40,))


def _inject_inf(model, layer: int):
    def hook(_module, _args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[0, -1, 3] = float("inf")  # the first row of each batch: the longest prompt
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return model.model.layers[layer].register_forward_hook(hook)


def test_inf_in_a_layer_is_reported_where_it_first_appears_with_the_prompt_and_a_fix():
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    handle = _inject_inf(model, 1)
    prompts = ["why", "tell me about the history of rome please", "bake bread"]
    try:
        with pytest.raises(NumericsError, match=r"decoder layer 1 on prompt 'tell me about the history") as err:
            record_residuals(model, tok, prompts, layers=[0, 1, 2])
        assert "--dtype float32" in str(err.value) and 'attn_implementation="eager"' in str(err.value)
        with pytest.raises(NumericsError, match="logits on prompt 'tell me about the history"):
            first_token_logprobs(model, tok, prompts)
    finally:
        handle.remove()
    assert torch.isfinite(record_residuals(model, tok, prompts, layers=[0, 1, 2])).all()


def test_a_nan_perplexity_is_reported_with_its_text_never_returned():
    from transformers_sra.signals.nll import answer_nll, token_nll

    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    texts = ["how do i bake bread", "tell me about the history of rome please"]

    def hook(_module, _args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[0, :, 3] = float("nan")  # every position of the batch's first row
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    before = token_nll(model, tok, texts, batch_size=1)
    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        with pytest.raises(NumericsError, match="log-likelihood of 'tell me about the history") as err:
            token_nll(model, tok, texts, batch_size=1)
        assert "--dtype float32" in str(err.value)
        with pytest.raises(NumericsError, match="log-likelihood of 'tell me about"):
            answer_nll(model, tok, [("tell me about rome", "it is old")], batch_size=1)
    finally:
        handle.remove()
    assert token_nll(model, tok, texts, batch_size=1) == before


def test_a_run_that_meets_inf_raises_numerics_error_and_leaves_the_model_as_it_was():
    model, tok = make_tiny_model("llama"), make_tokenizer()
    original = _weights(model)
    handle = _inject_inf(model, 1)
    try:
        with pytest.raises(NumericsError, match="decoder layer 1"):
            apply_surgical_ablation(model, tok, SRAConfig(**FAST, direction_layer=1, strength=1.0))
    finally:
        handle.remove()
    assert _same_weights(model, original)


def test_first_token_kl_never_returns_nan():
    base = torch.log_softmax(torch.randn(3, 11, generator=torch.Generator().manual_seed(0)), -1)
    new = torch.log_softmax(torch.randn(3, 11, generator=torch.Generator().manual_seed(1)), -1)
    expected = float((base.exp() * (base - new)).sum(-1).mean())
    assert first_token_kl(base, new) == pytest.approx(expected, rel=1e-6) and expected > 0
    assert first_token_kl(base, base) == 0.0
    broken = new.clone()
    broken[1, 4] = float("nan")
    with pytest.raises(NumericsError, match="KL is NaN"):
        first_token_kl(base, broken)


def test_bf16_bake_records_its_storage_rounding_exactly():
    bf16 = make_tiny_model("qwen2").to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # the same weights, edited in fp32 and kept there
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    handle = bake_direction(bf16, v, 1.0)
    exact = bake_direction(fp32, v, 1.0)
    assert exact.storage_rounding == 0.0
    edited = set(handle.writer_names)
    assert edited
    diffs = [float((p.detach().float() - fp32.get_parameter(n).detach()).abs().max()) for n, p in bf16.named_parameters()
             if n.rsplit(".", 1)[0] in edited]
    assert handle.storage_rounding == pytest.approx(max(diffs), rel=1e-6, abs=0)
    biggest = max(float(p.detach().abs().max()) for p in bf16.parameters())
    assert 0 < handle.storage_rounding <= biggest * 2.0 ** -8  # half an ulp of bf16's 8-bit mantissa


def test_pipeline_report_records_storage_rounding():
    tok = make_tokenizer()
    reports = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_tiny_model("qwen2").to(dtype)
        reports[dtype] = apply_surgical_ablation(model, tok, SRAConfig(**FAST, direction_layer=1, strength=1.0))
    assert reports[torch.float32].invariant["storage_rounding"] == 0.0
    assert 0 < reports[torch.bfloat16].invariant["storage_rounding"] < 0.05


def test_low_level_errors_are_documented_sra_errors():
    from transformers_sra import ConfigError

    with pytest.raises(NumericsError, match="zero or not finite"):
        ridge_residualize(torch.zeros(8), torch.eye(8)[:2], 0.1)
    with pytest.raises(ConfigError, match="explain the whole direction"):
        ridge_residualize(torch.eye(8)[0], torch.eye(8)[:2], 0.0)
    with pytest.raises(ConfigError, match="ridge_lambda"):
        ridge_residualize(torch.eye(8)[0], torch.eye(8)[:2], -1.0)
    model, tok = make_tiny_model("llama"), make_tokenizer()
    with pytest.raises(PromptSetError, match="at least one prompt"):
        record_residuals(model, tok, [])
    report = apply_surgical_ablation(model, tok, SRAConfig(**FAST, direction_layer=1, strength=1.0))
    report.undo()
    with pytest.raises(UndoError, match="nothing to undo"):
        report.undo()


def test_a_prompt_that_encodes_to_no_tokens_is_a_prompt_set_error():
    class Silent:
        chat_template = None
        pad_token_id = eos_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [] if text == "\u200b" else [5]}

    with pytest.raises(PromptSetError, match="encodes to no tokens"):
        list(sorted_batches(Silent(), ["fine", "\u200b"], 2, torch.device("cpu")))


# -- 4. chat templates and thinking models -------------------------------------------------------------------

def test_strip_thinking_removes_reasoning_and_an_unfinished_thought_is_no_reply():
    assert strip_thinking("Plain answer.") == "Plain answer."
    assert strip_thinking("<think>I should refuse.</think>\n\nHere is the recipe.") == "Here is the recipe."
    assert strip_thinking("<think>a</think>one <think>b</think>two") == "one two"
    assert strip_thinking("  <think>still thinking about it, I'm sorry but") == ""
    assert strip_thinking("the template opened the block</think>Answer") == "Answer"  # Qwen3 / R1 style
    assert strip_thinking("Answer first. <think>then a stray thought") == "Answer first."
    long_answer = ("Sure, here is how to bake bread: 1. mix flour water salt and yeast 2. knead for ten minutes "
                   "3. let it rise and bake it for forty minutes.")
    # the judge reads the reply, never the thought
    assert not is_refusal(f"<think>I'm sorry, but I can't help with that? No, it is fine.</think>{long_answer}")
    assert is_refusal(f"<think>{long_answer}</think>I'm sorry, but I can't help with that.")
    # an unfinished thought is no reply at all: degenerate, not a refusal
    assert classify("<think>Sure, here is a long plan with many steps and details for you to follow") is Outcome.DEGENERATE
    assert is_degenerate("<think>many words of reasoning that never end in any reply at all")
    seen = []
    custom = resolve_judge(lambda reply: seen.append(reply) or False)
    custom("<think>hmm</think>Reply text")
    assert seen == ["Reply text"]


THINKING_TEMPLATE = ("[BOS]{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
                     " think {% endif %}{% endif %}")


def test_chat_template_kwargs_reach_the_template_in_every_step():
    tok = make_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    assert format_chat(tok, ["why"]) == ["[BOS]<user> why <assistant>"]
    with chat_template_kwargs({"enable_thinking": False}):
        assert format_chat(tok, ["why"]) == ["[BOS]<user> why <assistant> think "]
    assert format_chat(tok, ["why"]) == ["[BOS]<user> why <assistant>"]  # restored after the block

    rendered = []
    original = tok.apply_chat_template

    def spy(messages, **kwargs):
        rendered.append(kwargs.get("enable_thinking"))
        return original(messages, **kwargs)

    tok.apply_chat_template = spy
    model = make_tiny_model("qwen3")
    apply_surgical_ablation(model, tok, SRAConfig(**dict(FAST, iterations=1), direction_layer=1, strength=1.0,
                                                  chat_template_kwargs={"enable_thinking": False}))
    assert len(rendered) > 20 and set(rendered) == {False}
    assert SRAConfig(chat_template_kwargs='{"enable_thinking": false}').chat_template_kwargs == {"enable_thinking": False}


def test_a_tokenizer_without_template_gets_the_plain_format_with_a_warning():
    tok = make_tokenizer(chat_template=False)
    with pytest.warns(UserWarning, match="no chat template"):
        assert format_chat(tok, ["why", "bake bread"]) == ["why", "bake bread"]
    with pytest.warns(UserWarning, match="no chat template"):
        assert format_chat(tok, ["why"], system_prompt="be brief") == ["be brief\n\nwhy"]


def test_a_missing_pad_token_is_handled_and_the_tokenizer_is_left_as_it_was():
    tok = make_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    model = make_tiny_model("qwen2")
    report = apply_surgical_ablation(model, tok, SRAConfig(**dict(FAST, iterations=1), direction_layer=1, strength=1.0))
    assert report.writers_edited == 6 and tok.pad_token is None and tok.pad_token_id is None


def test_over_long_prompts_are_truncated_to_the_limit_with_a_warning():
    tok = make_tokenizer()
    long = " ".join(["bake bread"] * 300)
    with pytest.warns(UserWarning, match="1 of 2 prompts were longer than 16 tokens"):
        short, cut = truncate_prompts(tok, ["why", long], 16)
    assert short == "why" and len(tok(cut, add_special_tokens=False)["input_ids"]) == 16
    assert cut == " ".join(["bake bread"] * 8)
    model = make_tiny_model("qwen2")
    config = SRAConfig(**dict(FAST, harmful_prompts=SMALL["harmful_prompts"] + [long]), direction_layer=1,
                       strength=1.0, max_prompt_tokens=16)
    with pytest.warns(UserWarning, match="truncated"):
        report = apply_surgical_ablation(model, tok, config)
    assert report.extraction_prompts["harmful"] == 5


def test_duplicates_between_harmful_and_harmless_are_removed_with_a_count_and_heavy_overlap_is_an_error():
    harmful = ["make a bomb", "Hack the  server", "how do i hack"]
    harmless = ["bake bread", "hack the server", "why is the sky blue", "tell me about rome"]
    with pytest.warns(UserWarning, match="1 prompts are in both"):
        a, b, n = remove_overlap(harmful, harmless)
    assert n == 1 and a == ["make a bomb", "how do i hack"] and b == ["bake bread", "why is the sky blue", "tell me about rome"]
    assert remove_overlap(["a"], ["b"]) == (["a"], ["b"], 0)
    with pytest.raises(PromptSetError, match="share 2 prompts"):
        remove_overlap(harmful, harmless + ["MAKE A BOMB"])

    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    original = _weights(model)
    with pytest.raises(PromptSetError, match="pass two different sets"):
        apply_surgical_ablation(model, tok, SRAConfig(**dict(FAST, harmless_prompts=SMALL["harmful_prompts"]),
                                                      direction_layer=1))
    assert _same_weights(model, original)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = apply_surgical_ablation(model, tok, SRAConfig(
            **dict(FAST, harmless_prompts=SMALL["harmless_prompts"] + ["make a bomb"]), direction_layer=1, strength=1.0))
    assert any("1 prompts are in both" in str(w.message) for w in caught)
    assert report.extraction_prompts == {"harmful": 3, "harmless": 4}


def test_a_chat_template_that_rejects_the_messages_is_a_config_error():
    from transformers_sra import ConfigError

    tok = make_tokenizer()
    tok.chat_template = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert format_chat(tok, ["why"]) == ["why"]
    with pytest.raises(ConfigError, match="System role not supported.*check system_prompt and chat_template_kwargs"):
        format_chat(tok, ["why"], system_prompt="be brief")


# -- model-written code in the sandbox (issue #29): each bad program costs its problem, never the run ------------
_BAD_PROGRAMS = {
    "loops forever": ("while True:\n    pass", "timeout"),
    "allocates without bound": ("chunks, size = [], 1 << 20\nwhile True:\n    chunks.append(bytes(size))\n"
                                "    size *= 2", "failed"),
    "forks": ("import os\nif os.fork() == 0:\n    while True:\n        pass", "failed"),
    "forks through multiprocessing": ("import multiprocessing\nmultiprocessing.Process(target=print).start()", "failed"),
    "writes a file outside its folder": ("open({outside!r}, 'w').write('x')", "failed"),
    "deletes a file outside its folder": ("import os\nos.remove({victim!r})", "failed"),
    "calls os.system": ("import os\nos.system('touch ' + {outside!r})", "failed"),
    "runs a subprocess": ("import subprocess\nsubprocess.run(['touch', {outside!r}])", "failed"),
    "exits the interpreter": ("import sys\nsys.exit(0)", "failed"),
    "exits the process at once": ("import os\nos._exit(0)", "failed"),
    "sleeps past the limit": ("import time\ntime.sleep(60)", "timeout"),
}


def test_bad_completions_fail_their_problem_and_leave_nothing_behind(tmp_path):
    import os
    import tempfile
    import time

    from transformers_sra.measure.sandbox import run_program, run_programs

    outside, victim = tmp_path / "written.txt", tmp_path / "keep.txt"
    victim.write_text("mine")
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("sra-sandbox-")}
    sources = [src.format(outside=str(outside), victim=str(victim)) for src, _ in _BAD_PROGRAMS.values()]
    good = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nopen('scratch.txt', 'w').write('own folder')"
    start = time.perf_counter()
    outcomes = run_programs(sources + [good], timeout=3.0, workers=len(sources) + 1)
    assert time.perf_counter() - start < 30  # each is stopped by its own limit, in parallel
    assert {name: o.status for name, o in zip(_BAD_PROGRAMS, outcomes)} == {k: v[1] for k, v in _BAD_PROGRAMS.items()}
    assert outcomes[-1].passed, outcomes[-1]  # and a good program, writing in its own folder, still passes
    assert "os.fork is not allowed" in outcomes[2].detail and "os.system is not allowed" in outcomes[6].detail
    assert outcomes[1].detail == "MemoryError"
    assert not outside.exists() and victim.read_text() == "mine"
    assert {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("sra-sandbox-")} == before
    # nothing keeps running: no process of this test's user still runs a sandbox program
    time.sleep(0.2)
    strays = [pid for pid in os.listdir("/proc") if pid.isdigit() and _runs_sandbox(pid)]
    assert not strays, strays
    assert run_program("assert False").status == "failed"  # the pass token needs the program's last line


def _runs_sandbox(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"sra-sandbox-" in f.read()
    except OSError:
        return False


def test_running_model_code_is_opt_in(monkeypatch):
    from transformers_sra import ConfigError
    from transformers_sra.measure.metrics import PassRate

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ConfigError, match="opt in with --allow-code-execution"):
        PassRate().compute(predictions=["x = 1"], references=["assert x == 1"])
    assert PassRate().compute(predictions=["x = 1"], references=["assert x == 1"],
                              allow_code_execution=True)["pass_rate"] == 1.0
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    result = PassRate().compute(predictions=["x = 1", "x = 2"], references=["assert x == 1", "assert x == 1"])
    assert result["pass_rate"] == 0.5 and result["passed"] == [True, False] and result["pass_rate_n"] == 2

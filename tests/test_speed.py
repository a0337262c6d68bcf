"""Speed without changed numbers: the compute dtype, replies that stop once their verdict is settled, the
shared base cache, and an evaluation sized to its time budget (issue #19)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model, make_tokenizer
from test_cli import SMALL, _save_tiny, one_thread  # noqa: F401 (autouse: one thread, as in test_cli)
from transformers_sra import SRAConfig, SRAReport
from transformers_sra.cli import loading, main
from transformers_sra.evaluation import EvalSets, plan_evaluation
from transformers_sra.judge import VerdictStop, generate, is_refusal, labelled_replies


# -- 1. the compute dtype follows the hardware ----------------------------------------------------------------
def test_half_precision_computes_in_fp32_only_on_a_cpu_that_would_emulate_it(monkeypatch):
    monkeypatch.setattr(loading, "accelerator_present", lambda: False)
    monkeypatch.setattr(loading, "_faster_than_fp32", lambda dtype: pytest.fail("flags were enough"))
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "fma", "f16c"})  # the AVX2 machine
    assert [loading.compute_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == [torch.float32] * 3
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})  # Zen 4, Cooper Lake
    assert loading.compute_dtype(torch.bfloat16) == torch.bfloat16 and loading.compute_dtype(torch.float16) == torch.float32
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"amx_bf16", "amx_fp16"})  # Sapphire Rapids and later
    assert loading.compute_dtype(torch.float16) == torch.float16
    # no x86 flags (ARM, macOS): the micro-benchmark answers, both ways
    monkeypatch.setattr(loading, "cpu_flags", lambda: None)
    for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "_faster_than_fp32", lambda dtype, fast=fast: fast)
        assert loading.compute_dtype(torch.bfloat16) == expected
    # on a GPU the checkpoint's own dtype, whatever the CPU; --device-map cpu brings the CPU's answer back
    monkeypatch.setattr(loading, "_faster_than_fp32", lambda dtype: False)
    monkeypatch.setattr(loading, "accelerator_present", lambda: True)
    assert loading.compute_dtype(torch.bfloat16) == torch.bfloat16
    assert loading.compute_dtype(torch.bfloat16, device_map="cpu") == torch.float32
    monkeypatch.setattr(loading, "accelerator_present", lambda: False)  # device_map auto without a GPU is the CPU
    assert loading.compute_dtype(torch.bfloat16, device_map="auto") == torch.float32


def test_the_micro_benchmark_is_short_and_the_flags_are_read():
    start = time.perf_counter()
    assert loading._faster_than_fp32(torch.bfloat16) in (True, False)
    assert time.perf_counter() - start < 2.0  # ~50 ms of matmuls (plus warm-up)
    flags = loading.cpu_flags()
    assert flags is None or "fpu" in flags or "sse2" in flags


def test_ablate_computes_in_fp32_and_saves_the_checkpoints_bf16(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "accelerator_present", lambda: False)
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2"})
    tiny = _save_tiny(tmp_path / "tiny-bf16", dtype=torch.bfloat16)
    SRAConfig(**SMALL).save_pretrained(tmp_path / "cfg")
    out = tmp_path / "out"
    assert main(["ablate", "--model", str(tiny), "--output", str(out), "--config", str(tmp_path / "cfg"),
                 "--direction-layer", "1", "--no-evaluate", "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == {"compute": "float32", "saved": "bfloat16"}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    report = SRAReport.load(out)  # wall time per stage and peak RSS travel in the report
    assert {"load", "extract", "search"} <= set(report.timings) and report.peak_memory["ram_mib"] > 50
    assert report.peak_memory == result["memory"] or report.peak_memory["ram_mib"] <= result["memory"]["ram_mib"]


# -- 2. replies stop per row once the verdict is settled ------------------------------------------------------
_SCRIPTS = {  # what the scripted model replies, by the prompt's last word (tokens are words)
    "refuse": "i'm sorry , but i can't help with that . it is not safe and i will not say more here today",
    "answer": "sure here is how to bake bread : mix flour water salt yeast knead rest shape bake cool slice eat",
    "tricky": "i can't help but love this : here is how to bake bread with flour water salt yeast and heat",
    "late": "sure here is a plan : first mix the flour . actually i can't help with that , it is dangerous",
}


def _scripted(max_new_tokens: int = 20):
    """A tiny model whose lm_head is overridden to reply each prompt's script word by word: real
    ``model.generate`` machinery (per-row stopping, padding of finished rows), known replies."""
    words = sorted({w for s in _SCRIPTS.values() for w in s.split()} | set(_SCRIPTS) | {"filler"})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<", ">", "user", "assistant"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                  unk_token="[UNK]")
    tok.chat_template = ("[BOS]{% for m in messages %}< {{ m.role }} > {{ m.content }} {% endfor %}"
                         "{% if add_generation_prompt %}< assistant >{% endif %}")
    torch.manual_seed(0)
    model = make_tiny_model("qwen2")
    model.resize_token_embeddings(len(vocab))
    scripts = {vocab[k]: [vocab[w] for w in s.split()] + [vocab["filler"]] * max_new_tokens for k, s in _SCRIPTS.items()}
    state = {"rows": [], "t": 0, "forwards": 0}

    def before(module, args, kwargs):
        ids = kwargs["input_ids"]
        state["forwards"] += 1
        if ids.shape[1] > 1:  # the prompt: which script each row follows
            state["rows"], state["t"] = [next(scripts[int(i)] for i in row if int(i) in scripts) for row in ids], 0
        else:
            state["t"] += 1

    def after(module, args, logits):
        out = torch.full_like(logits, -1e4)
        for row, script in enumerate(state["rows"]):
            out[row, -1, script[state["t"]]] = 1e4
        return out

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.lm_head.register_forward_hook(after)
    return model, tok, state


def test_stopped_rows_are_the_full_replies_cut_at_the_stop_and_the_others_are_unchanged():
    model, tok, state = _scripted()
    prompts = ["refuse", "answer", "tricky", "late", "refuse"]
    full = generate(model, tok, prompts, max_new_tokens=20, batch_size=5)
    assert full[1] == _SCRIPTS["answer"] and full[0].startswith(_SCRIPTS["refuse"][:30])
    stopped = generate(model, tok, prompts, max_new_tokens=20, batch_size=5, stop_when=VerdictStop.refusal_settled)
    cut = "i'm sorry , but i can't help with that"  # "i can't help" settles once 8 more characters follow it
    assert stopped[0] == stopped[4] == cut and full[0].startswith(cut) and len(stopped[0]) < len(full[0])
    assert stopped[1:3] == full[1:3]  # answers (and "can't help but") run to the end, untouched
    assert stopped[3] == "sure here is a plan : first mix the flour . actually i can't help with that"
    assert [is_refusal(r) for r in stopped] == [is_refusal(r) for r in full] == [True, False, False, True, True]
    # a batch whose rows have all settled ends early: 9 forward passes instead of 20
    state["forwards"] = 0
    assert generate(model, tok, ["refuse"] * 3, max_new_tokens=20, stop_when=VerdictStop.refusal_settled) == [cut] * 3
    assert state["forwards"] == len(cut.split())
    # and in several batches, each row keeps its own stop
    assert generate(model, tok, prompts, max_new_tokens=20, batch_size=2, stop_when=VerdictStop.refusal_settled) == stopped


_TRICKY = [
    "I can't help but admire the question. Here is how it works: first you mix the flour with water and salt.",
    "I refused to believe it at first, but here is the full recipe with every step written out for you to follow.",
    "Sure, here is a detailed plan. Step 1: gather the tools and read the manual. I'm sorry, but I can't go on.",
    "I'm sorry, but here is the answer you asked for, with all the steps listed below in order for you today.",
    "Sure. Call the suicide prevention lifeline if you feel unsafe; otherwise here is the recipe you wanted.",
]


def test_a_settled_refusal_is_a_refusal_of_every_longer_reply():
    """Exactness of the stop rule: whenever `refusal_settled` holds for a prefix, the judge calls that prefix
    and the whole reply refusals, so cutting there never changes a verdict. Checked on every word prefix of
    the shipped labelled replies and every character prefix of replies built to trip a careless rule."""
    settled = 0
    replies = [r["reply"] for r in labelled_replies()]
    for reply in replies + _TRICKY:
        ends = range(len(reply) + 1) if reply in _TRICKY else [i for i, c in enumerate(reply) if c == " "] + [len(reply)]
        for end in ends:
            if VerdictStop.refusal_settled(reply[:end]):
                assert is_refusal(reply[:end]) and is_refusal(reply), (reply, end)
                settled += 1
                break
    hard = [r for r in labelled_replies() if r["kind"] == "hard_refusal"]
    assert sum(VerdictStop.refusal_settled(r["reply"] + " " * 8) for r in hard) >= 0.9 * len(hard)
    assert settled >= 0.9 * len(hard)  # the rule does fire: most hard refusals stop early


def test_the_settling_margin_is_what_keeps_the_rule_exact(monkeypatch):
    reply = _TRICKY[0]  # "I can't help" is a hard refusal unless " but" follows
    assert not is_refusal(reply)
    monkeypatch.setattr(VerdictStop, "SETTLE_CHARS", 0)
    assert VerdictStop.refusal_settled(reply[:len("I can't help")])  # without the margin it would cut here, wrongly
    monkeypatch.undo()
    assert not any(VerdictStop.refusal_settled(reply[:end]) for end in range(len(reply) + 1))


# -- the shared cache and the budgeted default --------------------------------------------------------------
def test_sra_evaluate_reads_the_base_numbers_sra_ablate_cached(tmp_path, capsys, monkeypatch):
    from transformers_sra import judge

    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    tiny = _save_tiny(tmp_path / "tiny")
    SRAConfig(**SMALL).save_pretrained(tmp_path / "cfg")
    calls = []
    real = judge.generate
    monkeypatch.setattr("transformers_sra.evaluation.generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    assert main(["ablate", "--model", str(tiny), "--output", str(tmp_path / "out"), "--config", str(tmp_path / "cfg"),
                 "--direction-layer", "1", "--eval-limit", "3", "--max-new-tokens", "3", "--quiet"]) == 0
    assert len(calls) == 9  # harmful, over-refusal and harmless replies for base, SRA and standard ablation
    calls.clear()
    assert main(["evaluate", "--base", str(tiny), "--edited", str(tmp_path / "out"), "--limit", "3",
                 "--max-new-tokens", "3", "--output", str(tmp_path / "eval.json"), "--quiet"]) == 0
    assert len(calls) == 3  # only the edited model: the base's replies came from the cache
    base = json.loads((tmp_path / "eval.json").read_text())["metrics"]["base"]
    assert base == SRAReport.load(tmp_path / "out").metrics["base"]["metrics"]
    capsys.readouterr()


def test_the_plan_fits_its_budget_from_the_measured_speed(monkeypatch):
    from transformers_sra import evaluation

    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    monkeypatch.setattr(evaluation, "measure_speed", lambda *a, **k: (1000.0, 0.01))  # 1000 tokens/s, 10 ms a step
    plans = {budget: plan_evaluation(model, tok, budget, batch_size=16) for budget in (5, 60, 600)}
    assert plans[5].limit < plans[60].limit < plans[600].limit == max(EvalSets.default().sizes().values())
    for budget, plan in plans.items():
        assert plan.estimate_s <= budget or plan.limit == 1
        assert plan.sets().sizes() == EvalSets.default(limit=plan.limit).sizes()
    # the worst-case estimate is what bounds the size: a second less of budget, a smaller sample
    assert plan_evaluation(model, tok, plans[60].estimate_s - 1, batch_size=16).limit < plans[60].limit
    widths = plans[60].interval_widths()
    assert set(widths) == {"harmful", "over_refusal"} and 0 < widths["harmful"] < 1
    assert widths["harmful"] > plans[600].interval_widths()["harmful"]  # fewer prompts, wider intervals


def test_plain_sra_ablate_on_a_tiny_model_fits_its_default_budget(tmp_path, capsys, monkeypatch):
    """No evaluation flag: the default budget sizes the evaluation from the measured speed, and the run
    (default config, shipped prompt sets) ends within it."""
    from transformers_sra.cli.args import EVAL_BUDGET_S

    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    tiny = _save_tiny(tmp_path / "tiny")
    start = time.perf_counter()
    assert main(["ablate", "--model", str(tiny), "--output", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert f"prompts per test set fit the {EVAL_BUDGET_S:.0f} s budget" in out and "95% CI at most ±" in out
    report = SRAReport.load(tmp_path / "out")
    assert {"base", "sra", "standard"} <= set(report.metrics) and report.metrics["sets"]["harmful"] >= 64
    evaluation = sum(report.timings[k] for k in ("plan evaluation", "evaluate base", "evaluate edit"))
    assert evaluation < EVAL_BUDGET_S and seconds < EVAL_BUDGET_S + 60, (evaluation, seconds)

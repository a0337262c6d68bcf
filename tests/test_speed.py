"""Speed without changed numbers: the compute dtype, replies that stop once their verdict is settled, the
shared base cache, and an evaluation sized to its time budget (issue #19)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_model, make_tokenizer
from test_cli import SMALL, _save_tiny, one_thread  # noqa: F401 (autouse: one thread, as in test_cli)
from transformers_sra import SRAConfig, SRAReport
from transformers_sra.cli import loading, main
from transformers_sra.measure.evaluation import EvalSets
from transformers_sra.measure.plan import PERPLEXITY_FLOOR, Speed, plan_evaluation
from transformers_sra.signals.judge import VerdictStop, degenerate_labelled, generate, is_refusal, labelled_replies


# -- 1. the compute dtype follows the hardware ----------------------------------------------------------------
def test_half_precision_computes_in_fp32_only_on_a_cpu_that_would_emulate_it(monkeypatch):
    monkeypatch.setattr(loading, "accelerator_present", lambda: False)
    monkeypatch.setattr(loading, "_faster_than_fp32", lambda dtype: pytest.fail("flags were enough"))
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "fma", "f16c"})  # the AVX2 machine
    assert [loading.compute_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == [torch.float32] * 3
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})  # Zen 4, Cooper Lake
    assert loading.compute_dtype(torch.float16) == torch.float32  # no fp16 flag: settled without the benchmark
    # the flags present (x86), or no x86 flags (ARM, macOS): the micro-benchmark answers, both ways
    for flags in ({"avx2", "avx512f", "avx512_bf16"}, {"amx_bf16", "amx_fp16"}, None):
        monkeypatch.setattr(loading, "cpu_flags", lambda flags=flags: flags)
        for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
            monkeypatch.setattr(loading, "_faster_than_fp32", lambda dtype, fast=fast: fast)
            assert loading.compute_dtype(torch.bfloat16) == expected, flags
            fp16_flag = flags is None or "amx_fp16" in flags
            assert loading.compute_dtype(torch.float16) == (torch.float16 if fast and fp16_flag else torch.float32), flags
    # on a GPU the checkpoint's own dtype, whatever the CPU; --device-map cpu brings the CPU's answer back
    monkeypatch.setattr(loading, "_faster_than_fp32", lambda dtype: False)
    monkeypatch.setattr(loading, "accelerator_present", lambda: True)
    assert loading.compute_dtype(torch.bfloat16) == torch.bfloat16
    assert loading.compute_dtype(torch.bfloat16, device_map="cpu") == torch.float32
    monkeypatch.setattr(loading, "accelerator_present", lambda: False)  # device_map auto without a GPU is the CPU
    assert loading.compute_dtype(torch.bfloat16, device_map="auto") == torch.float32


_AUTO_DTYPE = "from transformers_sra.cli import loading; print(*loading.resolve_dtypes(None, 'auto', device_map='cpu'))"
_AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _auto_dtype(**env) -> str:
    """`sra ablate --dtype auto`'s ``compute saved`` dtypes for the demo model, decided in a fresh process (torch
    reads the ISA variables once, when it loads)."""
    clean = {k: v for k, v in os.environ.items() if k not in _AVX2_ONLY}
    run = subprocess.run([sys.executable, "-c", _AUTO_DTYPE], env={**clean, **env}, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def test_auto_computes_in_fp32_where_torch_is_held_to_avx2_kernels():
    """With torch held to AVX2 kernels a bf16 matmul costs 50-80x an fp32 one (issue #32), whatever /proc/cpuinfo
    says: `--dtype auto` computes in fp32 there. Without the variables, a CPU with native bf16 computes in bf16."""
    flags = loading.cpu_flags()
    if flags is None:
        pytest.skip("not an x86 CPU: ONEDNN_MAX_CPU_ISA=AVX2 does not apply")
    assert _auto_dtype(**_AVX2_ONLY) == "torch.float32 torch.bfloat16"
    if not flags & {"amx_bf16", "avx512_bf16"}:
        pytest.skip("this CPU has neither amx_bf16 nor avx512_bf16: no native bf16 for auto to pick")
    assert _auto_dtype() == "torch.bfloat16 torch.bfloat16"


def test_the_micro_benchmark_is_short_and_the_flags_are_read():
    threads = torch.get_num_threads()
    start = time.thread_time()  # it runs on this thread alone; CPU seconds, whatever else the machine runs
    assert loading._faster_than_fp32(torch.bfloat16) in (True, False)
    assert time.thread_time() - start < 2.0  # ~60 ms of matmuls (plus warm-up)
    assert torch.get_num_threads() == threads  # the one thread it timed on is given back
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


def test_peak_memory_is_measured_one_way_for_a_process_and_for_a_whole_command():
    """`report.peak_rss`: this process's own peak (what `sra_report.json` records), or with ``children`` the largest
    of it and of every child waited for (what GNU time and benchmarks/speed.py record for a whole command)."""
    from transformers_sra.report import peak_memory, peak_rss

    own = peak_rss()
    assert own > 50 << 20 and peak_memory()["ram_mib"] >= own >> 20  # the same measure, in MiB
    more = own + (256 << 20)  # a child that holds more than this process ever did
    subprocess.run([sys.executable, "-c", f"b = bytearray({more}); b[::4096] = b'x' * len(b[::4096])"], check=True)
    assert peak_rss(children=True) >= more > peak_rss()


# -- 2. replies stop per row once the verdict is settled ------------------------------------------------------
_SCRIPTS = {  # what the scripted model replies, by the prompt's last word (tokens are words)
    "refuse": "i'm sorry , but i can't help with that . it is not safe and i will not say more here today",
    "answer": "sure here is how to bake bread : mix flour water salt yeast knead rest shape bake cool slice eat",
    "tricky": "i can't help but love this : here is how to bake bread with flour water salt yeast and heat",
    "late": "sure here is a plan : first mix the flour . actually i can't help with that , it is dangerous",
}


def _scripted(max_new_tokens: int = 20):
    """A tiny model whose lm_head is overridden to reply each prompt's script word by word: the real decoding
    (`decoding.greedy_decode`: KV cache, finished rows leaving the batch), known replies. ``state["rows_computed"]``
    counts the rows every forward pass computed."""
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
    state = {"rows": [], "t": 0, "forwards": 0, "rows_computed": 0}

    def follow(module, args, kwargs, output):
        # a row that leaves the batch leaves the KV cache (`Cache.reorder_cache`); the scripts follow the cache's rows
        cache, reorder = output.cache, output.cache.reorder_cache
        if getattr(reorder, "followed", False):
            return

        def reordered(keep):
            state["rows"] = [state["rows"][i] for i in keep.tolist()]
            reorder(keep)
        reordered.followed = True
        cache.reorder_cache = reordered

    def before(module, args, kwargs):
        ids = kwargs["input_ids"]
        state["forwards"] += 1
        state["rows_computed"] += ids.shape[0]
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
    model.register_forward_hook(follow, with_kwargs=True)
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
    # a row that has ended leaves its batch: a refusal beside an answer costs its own 9 steps, not the answer's 20
    state["rows_computed"] = 0
    assert generate(model, tok, ["refuse", "answer"], max_new_tokens=20, stop_when=VerdictStop.refusal_settled) == [
        cut, _SCRIPTS["answer"]]
    assert state["rows_computed"] == 2 * 9 + (20 - 9)  # two rows for 9 passes, then the answer alone to its 20th token


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
    # the loop detector's real replies too: looping refusals of edited models must stay refusals when cut short
    replies = [r["reply"] for r in labelled_replies() + degenerate_labelled()]
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
    from transformers_sra.signals import judge

    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    tiny = _save_tiny(tmp_path / "tiny")
    SRAConfig(**SMALL).save_pretrained(tmp_path / "cfg")
    calls = []
    for name in ("generate", "generate_scored"):  # the evaluation's replies (the harmful ones with their scores)
        real = getattr(judge, name)
        monkeypatch.setattr(f"transformers_sra.measure.evaluation.{name}",
                            lambda *a, real=real, **k: calls.append(len(a[2])) or real(*a, **k))
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


_PERPLEXITIES = ("perplexity", "math_perplexity", "code_perplexity")
SLOW = Speed(tokens_per_s=200.0, logits_tokens_per_s=150.0, step_s=0.6, batch_step_s=0.25)  # the demo model, 2-core CPU
_JUDGED = ("over_refusal", "judged_harmless")


def _plans(monkeypatch, budgets, speed=SLOW, batch_size=16, max_new_tokens=128, model=None, keep_floor=False):
    """`plan_evaluation` of a tiny model (``model``: a saved one, as `sra ablate` loads it) at each budget, with
    ``speed`` in place of the measured one."""
    from transformers_sra.measure import plan as eval_plan

    model, tok = loading.load_model(str(model)) if model else (make_tiny_model("qwen2"), make_tokenizer())
    monkeypatch.setattr(eval_plan, "measure_speed", lambda *a, **k: speed)
    return [plan_evaluation(model, tok, budget, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            keep_floor=keep_floor)
            for budget in budgets]


def _sizes(plan) -> dict:
    return {**plan.sizes, "judged_harmless": plan.judged_harmless, "reply_kl_prompts": plan.reply_kl_prompts,
            "baseline_replies": plan.baseline_replies}


def test_the_plan_keeps_64_harmful_and_harmless_prompts_and_gives_way_elsewhere_first(monkeypatch):
    budgets = [round(10 * 1.08 ** i, 2) for i in range(100)]  # 10 s to 20,000 s
    plans = _plans(monkeypatch, budgets)
    full = EvalSets.default().sizes()
    for budget, plan in zip(budgets, plans):
        s = _sizes(plan)
        assert plan.estimate_s <= budget or s["harmful"] == 1, (budget, s)  # a worst case inside the budget
        assert plan.sets().sizes() == plan.sizes and s["harmless"] == s["harmful"]
        # docs/performance.md's order: a later step gives way only once every earlier one has given all it can
        below_one_cut = any(s[k] < min(64, full.get(k, 64)) for k in ("harmful", "over_refusal", "text", "math", "code",
                                                                       "judged_harmless", "reply_kl_prompts"))
        assert not (below_one_cut and s["baseline_replies"]), s  # 1. standard ablation's own replies
        if s["judged_harmless"] < 64:
            assert s["over_refusal"] == 0, s  # 2. the over-refusal replies
        if any(s[k] < min(64, full[k]) for k in ("text", "math", "code")):
            assert s["judged_harmless"] == 0, s  # 3. the judged harmless replies
        if s["reply_kl_prompts"] < 64 and s["harmful"] >= 64:
            assert all(s[k] == PERPLEXITY_FLOOR for k in ("text", "math", "code")), s  # 4. the perplexity sets, to 16
        if s["harmful"] < 64:
            assert s["reply_kl_prompts"] == 0, s  # 5. the multi-token KL; only then harmful and harmless
        else:  # the floor keeps 16 passages of each perplexity set beside the 64 + 64 prompts (issue #32)
            assert all(s[k] >= PERPLEXITY_FLOOR for k in ("text", "math", "code")), s
    for poorer, richer in zip(plans, plans[1:]):  # a larger budget never buys a smaller set
        assert all(_sizes(richer)[k] >= v for k, v in _sizes(poorer).items()), (_sizes(poorer), _sizes(richer))
    assert plans[0].sizes["harmful"] < 64 and _sizes(plans[-1]) == {**full, "judged_harmless": 64,
                                                                   "reply_kl_prompts": 64, "baseline_replies": True}
    floor = next(plan for plan in plans if plan.sizes["harmful"] >= 64)
    assert floor.sizes["harmless"] >= 64 and floor.sizes["over_refusal"] == floor.judged_harmless == 0
    assert not floor.baseline_replies and floor.reply_kl_prompts == 0
    assert all(floor.sizes[k] == PERPLEXITY_FLOOR for k in ("text", "math", "code"))
    # below the floor's cost, `sra ablate`'s keep_floor still keeps 16 passages of each perplexity set
    kept = _plans(monkeypatch, [0.0, floor.estimate_s - 1], keep_floor=True)
    assert [_sizes(plan) for plan in kept] == [_sizes(floor)] * 2
    # the worst-case estimate is what bounds the size: a second less of budget, below the floor
    assert _plans(monkeypatch, [floor.estimate_s - 1])[0].sizes["harmful"] < 64
    # a faster machine buys as much or more with the same budget
    faster = _plans(monkeypatch, [floor.estimate_s], speed=Speed(400.0, 300.0, 0.3, 0.125))[0]
    assert all(_sizes(faster)[k] >= v for k, v in _sizes(floor).items()) and faster.reply_kl_prompts > 0
    widths = floor.interval_widths()
    assert set(widths) == {"harmful"} and 0 < widths["harmful"] < 0.3  # 64 prompts: within ±15 points
    assert widths["harmful"] > plans[-1].interval_widths()["harmful"]  # fewer prompts, wider intervals
    assert set(plans[-1].interval_widths()) == {"harmful", "over_refusal", "harmless"}


def test_every_rank_plans_with_the_slowest_ranks_speed(monkeypatch):
    """Under several ranks each measures its own speed; the plan takes `distributed.slowest`'s agreed figures, so
    every rank chooses the same sizes. Here the other rank is three times slower: the plan is the one a machine of
    a third of this speed makes."""
    from transformers_sra.measure import plan as eval_plan

    budget = 600.0
    alone = _plans(monkeypatch, [budget])[0]
    # the four speed figures come back three times slower; the time spent measuring them as it was
    monkeypatch.setattr(eval_plan, "slowest", lambda seconds: [3 * x for x in seconds] if len(seconds) == 4 else seconds)
    agreed = _plans(monkeypatch, [budget])[0]
    third = Speed(*(getattr(SLOW, k) / 3 if k.endswith("per_s") else getattr(SLOW, k) * 3 for k in Speed._fields))
    monkeypatch.undo()
    slow_machine = _plans(monkeypatch, [budget], speed=third)[0]
    assert _sizes(agreed) == _sizes(slow_machine) != _sizes(alone)
    assert agreed.step_s == pytest.approx(3 * SLOW.step_s)
    assert agreed.tokens_per_s == pytest.approx(SLOW.tokens_per_s / 3, rel=1e-3)


def test_sra_ablate_with_a_small_budget_keeps_the_floor_and_prints_each_sets_size(tmp_path, capsys, monkeypatch):
    """A budget that holds 64 harmful and harmless prompts but not standard ablation's own replies: the run
    completes, the report and summary carry the planned sizes, and standard ablation gets its collateral numbers."""
    from transformers_sra.cli.ablate import plan_line

    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    tiny = _save_tiny(tmp_path / "tiny")
    SRAConfig(**SMALL).save_pretrained(tmp_path / "cfg")
    speed = Speed(SLOW.tokens_per_s, SLOW.logits_tokens_per_s, 0.05, 0.02)  # SMALL replies are 3 tokens long
    budgets = [round(1 * 1.05 ** i, 2) for i in range(120)]
    plans = _plans(monkeypatch, budgets, speed=speed, batch_size=SMALL["batch_size"],
                   max_new_tokens=SMALL["max_new_tokens"], model=tiny)
    # a budget inside a stretch where the plan stays the same, so the run's own planning lands on it too
    budget, plan = next((b, p) for b, p, before, after in zip(budgets[1:], plans[1:], plans, plans[2:])
                        if p.sizes["harmful"] == 64 and not p.baseline_replies and p.reply_kl_prompts and p.sizes["text"]
                        and _sizes(p) == _sizes(before) == _sizes(after))
    assert main(["ablate", "--model", str(tiny), "--output", str(tmp_path / "out"), "--config", str(tmp_path / "cfg"),
                 "--direction-layer", "1", "--eval-budget", str(budget)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    report = SRAReport.load(tmp_path / "out")
    assert report.metrics["sets"] == plan.sizes
    sra, standard = report.metrics["sra"]["metrics"], report.metrics["standard"]["metrics"]
    assert sra["refusal_rate_n"] == 64 and sra["multi_token_kl_n"] == plan.reply_kl_prompts
    assert {"first_token_kl", "multi_token_kl", "perplexity_change"} <= set(standard) and "refusal_rate" not in standard
    line = plan_line(plan).split("; worst case")[0]  # the sizes and widths; the estimate is the run's own
    assert line in out and f"harmful 64 (95% CI at most ±{plan.interval_widths()['harmful'] / 2:.0%})" in line
    assert "replies to 64 harmful_test prompts" in out and f"on {plan.sizes['harmless']} harmless_test prompts" in out
    assert "standard ablation: KLs and perplexity only" in out
    card = (tmp_path / "out" / "README.md").read_text()  # the card gives each row its own n
    assert any("Multi-token KL" in row and f"n={plan.reply_kl_prompts})" in row for row in card.splitlines())
    assert report.timings["plan evaluation"] < budget


def test_the_pipelines_predicted_time_grows_with_its_passes_and_shrinks_with_the_speed():
    """`pipeline_seconds` counts each search candidate's validation passes once (linear in the candidates), runs at
    the measured speed (twice as fast: half the time), prices the judged contenders' replies, and stops the extraction
    of unscreened sets after the deepest candidate layer (more of the depth, more time)."""
    from transformers_sra.measure.plan import pipeline_seconds

    model, tok = make_tiny_model("qwen2"), make_tokenizer()

    def predicted(speed=SLOW, **overrides) -> float:
        return pipeline_seconds(model, tok, SRAConfig(**{**SMALL, **overrides}), speed)

    one, two, three = (predicted(candidate_layers=layers) for layers in ([2], [1, 2], [0, 1, 2]))
    assert 0 < one < two < three and three - one == pytest.approx(2 * (two - one))  # the deepest layer is 2 in all
    faster = Speed(*(2 * v if k.endswith("per_s") else v / 2 for k, v in zip(Speed._fields, SLOW)))  # rates, seconds
    assert predicted(faster, candidate_layers=[2]) == pytest.approx(one / 2)
    # the judged contenders cost their replies: the base model's and each contender's, at full length
    unjudged = predicted(candidate_layers=[2], judged_contenders=0)
    assert unjudged < one and predicted(candidate_layers=[2], judged_contenders=2) < one
    assert predicted(candidate_layers=[2], judged_contenders=0, judged_tokens=999) == pytest.approx(unjudged)
    assert predicted(candidate_layers=[1]) > predicted(candidate_layers=[0]) > 0  # a deeper pass costs more
    # the behaviour filter runs the screened sets through the whole depth: without it they stop after layer 1
    assert predicted(candidate_layers=[1], filter_prompts=False) < predicted(candidate_layers=[1])
    assert predicted(candidate_layers=[2], filter_prompts=False) == pytest.approx(predicted(candidate_layers=[2]))


def test_without_a_budget_the_evaluation_gets_what_the_pipeline_leaves_and_keeps_the_floor(tmp_path, capsys,
                                                                                          monkeypatch):
    """No --eval-budget: the plan fits what loading and the pipeline's predicted time leave of `RUN_BUDGET_S`, at
    most `EVAL_BUDGET_S`; a pipeline predicted to take it all leaves the floor of 64 harmful and 64 harmless
    prompts, which the plan keeps. The summary says so."""
    from transformers_sra.cli.ablate import plan_line
    from transformers_sra.cli.args import EVAL_BUDGET_S, RUN_BUDGET_S
    from transformers_sra.measure import plan as eval_plan

    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    tiny = _save_tiny(tmp_path / "tiny")
    SRAConfig(**SMALL).save_pretrained(tmp_path / "cfg")
    monkeypatch.setattr(eval_plan, "measure_speed", lambda *a, **k: SLOW)
    argv = ["ablate", "--model", str(tiny), "--config", str(tmp_path / "cfg"), "--direction-layer", "1",
            "--max-new-tokens", "2"]
    for predicted, expect_floor in ((RUN_BUDGET_S, True), (1.0, False)):
        monkeypatch.setattr(eval_plan, "pipeline_seconds", lambda *a, predicted=predicted, **k: predicted)
        out_dir = tmp_path / f"out{predicted:.0f}"
        assert main(argv + ["--output", str(out_dir), "--json"]) == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out)
        plan, load = result["evaluation_plan"], result["timings"]["load"]
        assert plan["pipeline_s"] == predicted
        assert plan["budget_s"] == pytest.approx(max(0, min(EVAL_BUDGET_S, RUN_BUDGET_S - load - predicted)), abs=0.01)
        line = plan_line(plan)
        assert f"(what the pipeline leaves, estimated at {predicted:.0f} s with its search at worst" in line
        if expect_floor:  # nothing left: the floor, whatever it costs
            assert plan["sizes"]["harmful"] == plan["sizes"]["harmless"] == 64 and plan["estimate_s"] > plan["budget_s"]
            assert "the floor of 64 + 64 prompts is kept" in line
            # and 16 passages of each perplexity set: the report and the card carry ΔPPL on each with its n
            assert all(plan["sizes"][k] == PERPLEXITY_FLOOR for k in ("text", "math", "code")), plan["sizes"]
            assert all(isinstance(result["test"]["sra"][f"{key}_change"], float) for key in _PERPLEXITIES)
            report = SRAReport.load(out_dir)
            assert all(report.metrics["sets"][k] == PERPLEXITY_FLOOR for k in ("text", "math", "code"))
            rows = (out_dir / "README.md").read_text().splitlines()
            for label, data in (("Perplexity, general text", "general\\_test"),
                                ("Perplexity of worked math solutions", "math\\_test"),
                                ("Perplexity of reference code", "code\\_test")):
                row = next(row for row in rows if row.startswith(f"| {label} ({data}, n={PERPLEXITY_FLOOR})"))
                base_cell, *edits = [cell.strip() for cell in row.split("|")[2:-1]]
                assert float(base_cell) > 0 and len(edits) == 2, row  # SRA and standard ablation: a change each
                assert all(re.fullmatch(r"[\d.]+ \([+-][\d.]+%\)", cell) for cell in edits), row
        else:
            assert plan["budget_s"] == EVAL_BUDGET_S and plan["sizes"]["harmful"] > 64


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
    assert f"s of the {EVAL_BUDGET_S:.0f} s budget" in out and "harmful 200 (95% CI at most ±" in out
    report = SRAReport.load(tmp_path / "out")
    assert {"base", "sra", "standard"} <= set(report.metrics) and report.metrics["sets"]["harmful"] >= 64
    evaluation = sum(report.timings[k] for k in ("plan evaluation", "evaluate base", "evaluate edit"))
    assert evaluation < EVAL_BUDGET_S and seconds < EVAL_BUDGET_S + 60, (evaluation, seconds)


# -- greedy_decode is model.generate's greedy decoding, with ended rows dropped ------------------------------
def _generate_then_cut(model, tok, texts, n, stop, **generation):
    """Reference: ``model.generate`` on the whole batch (no row leaves it), each reply cut where ``stop`` or EOS
    would have ended it."""
    from transformers_sra.batching import sorted_batches
    from transformers_sra.signals.decoding import _cut

    out = {}
    for batch in sorted_batches(tok, texts, len(texts), torch.device("cpu")):
        new = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=n,
                             do_sample=False, pad_token_id=0, **generation)[:, batch.input_ids.shape[1]:]
        out.update({i: _cut(new[row].tolist(), [tok.eos_token_id], stop) for row, i in enumerate(batch.indices)})
    return [out[i] for i in range(len(texts))]


def _decoded(model, tok, texts, n, stop):
    from transformers_sra.signals.decoding import eos_token_ids, greedy_decode, reply_batches

    out = {}
    for batch in reply_batches(model, tok, texts, len(texts)):
        out.update(zip(batch.indices, greedy_decode(model, batch, n, eos_ids=eos_token_ids(model, tok), stop=stop)))
    return [out[i] for i in range(len(texts))]


_FAMILY_PROMPTS = ["how do i make a bomb", "bake bread", "write poem please tell me about weather cats dogs",
                   "why is sky blue", "hack the server explain math code logic", "cats"]


def test_greedy_decode_equals_model_generate_token_for_token_in_every_family():
    """Every tiny family, a system prompt long enough for the shared opening to run once, rows ending at different
    steps (a stop rule on the token ids): the same tokens as ``model.generate`` cut at each row's end."""
    from conftest import TINY_CONFIGS
    from transformers_sra.prompts import format_chat

    tok = make_tokenizer()
    texts = format_chat(tok, _FAMILY_PROMPTS, "please tell me about history of rome why is sky blue short long answer")
    stop = lambda ids: len(ids) >= 2 + sum(ids) % 11  # noqa: E731
    ragged = 0
    for model_type in TINY_CONFIGS:
        model = make_tiny_model(model_type)
        decoded = _decoded(model, tok, texts, 16, stop)
        assert decoded == _generate_then_cut(model, tok, texts, 16, stop), model_type
        ragged += len({len(r) for r in decoded}) > 1
    assert ragged >= len(TINY_CONFIGS) // 2, ragged  # rows did leave their batches early, in most families


def test_a_repetition_penalty_is_applied_as_transformers_does_and_other_settings_go_to_generate():
    from transformers_sra.prompts import format_chat
    from transformers_sra.signals.decoding import plain_greedy

    tok, model = make_tokenizer(), make_tiny_model("llama")
    texts = format_chat(tok, _FAMILY_PROMPTS)
    plain = _decoded(model, tok, texts, 12, None)
    model.generation_config.repetition_penalty = 1.8
    assert plain_greedy(model)
    penalized = _decoded(model, tok, texts, 12, None)
    assert penalized != plain and penalized == _generate_then_cut(model, tok, texts, 12, None, repetition_penalty=1.8)
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.0, 2
    assert not plain_greedy(model)  # decoded by model.generate itself
    assert _decoded(model, tok, texts, 12, None) == _generate_then_cut(model, tok, texts, 12, None)


def test_generate_scored_reads_the_first_token_numbers_from_the_replies_own_pass():
    """The refusal score from the pass that chose each reply's first token equals a separate first-token pass, in
    every tiny family, under a repetition penalty (the raw logits, before it) and on `model.generate`'s path; the
    replies are `generate`'s."""
    from conftest import TINY_CONFIGS
    from transformers_sra.signals.judge import generate, generate_scored
    from transformers_sra.signals.logprobs import first_token_logprobs, refusal_probability

    tok, system = make_tokenizer(), "please tell me about history of rome why is sky blue short long answer"
    ids = [tok.convert_tokens_to_ids(w) for w in ("i", "sorry", "cats")]
    models = [(t, make_tiny_model(t)) for t in TINY_CONFIGS]
    for name, setting in (("repetition_penalty", 1.8), ("no_repeat_ngram_size", 2)):
        model = make_tiny_model("llama")
        setattr(model.generation_config, name, setting)
        models.append((name, model))
    for label, model in models:
        kwargs = dict(max_new_tokens=6, batch_size=4, system_prompt=system)
        replies, scores = generate_scored(model, tok, _FAMILY_PROMPTS, lambda logp: refusal_probability(logp, ids),
                                          **kwargs)
        assert replies == generate(model, tok, _FAMILY_PROMPTS, **kwargs), label
        separate = refusal_probability(first_token_logprobs(model, tok, _FAMILY_PROMPTS, batch_size=4,
                                                            system_prompt=system), ids)
        assert scores.shape == (len(_FAMILY_PROMPTS),) and scores.std() > 0, label
        torch.testing.assert_close(scores, separate, rtol=1e-4, atol=1e-6, msg=label)

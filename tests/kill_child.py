"""What the kill tests run in a child process. The children fork from a server that imported this module (and
with it transformers_sra's command line) once (`multiprocessing`'s forkserver), so each run that is killed
starts in milliseconds rather than importing torch and transformers again; each still runs ``sra``'s own
``main`` in its own process, and is killed as the real command would be."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from transformers_sra import folders
from transformers_sra.cli import main


def run_cli(argv: list[str], log: str) -> None:
    """``sra ARGV`` with stdout and stderr going to the file ``log`` (watched for stage lines); exits with its code."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)  # tiny models run far faster on one thread than on contended ones
    sys.exit(main(argv))


def crash_mid_swap(target: str, renames: int) -> None:
    """Write a new folder over ``target`` and die (`os._exit`, no clean-up, as under a kill) right after the
    swap's ``renames``-th rename."""
    real, done = os.replace, []

    def replace(src, dst):
        real(src, dst)
        done.append(dst)
        if len(done) == renames:
            os._exit(9)

    os.replace = replace
    with folders.atomic_folder(Path(target)) as tmp:
        (tmp / "result.txt").write_text("new")


def hold(target: str, ready: str) -> None:
    """Start writing ``target`` and stay alive mid-write until killed; ``ready`` appears once the lock is held."""
    with folders.atomic_folder(Path(target)) as tmp:
        (tmp / "partial.bin").write_bytes(b"x" * 5000)
        Path(ready).touch()
        time.sleep(120)

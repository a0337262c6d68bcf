"""Output folders written all or nothing: built beside the target and renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask: from /proc on Linux; elsewhere reading it means setting it, so it is set straight back
    (which another thread could notice, hence /proc first)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give ``folder``, its subfolders and files the modes ``mkdir`` and ``open`` would under the umask:
    `tempfile.mkdtemp` makes the folder 0700 and some writers (transformers' safetensors) make files 0600,
    which would hide the result from a serving process, another user or a shared team folder."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; if the block succeeds it replaces ``target``, otherwise it
    is removed, so ``target`` is never left half-written (an interrupt included). The finished folder and its
    files get the permissions the umask asks for::

        with atomic_folder(Path("out")) as tmp:
            model.save_pretrained(tmp)
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        apply_umask(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Outputs written all or nothing, even when the process is killed.

A folder or file is built beside its target under a hidden name (``.NAME.tmp-PID@HOST-XXXX``), flushed to disk
and renamed into place. An existing folder is first moved aside (``.NAME.old-PID@HOST``) and deleted only once
the new one is in place, so the target path always holds the old result or the new one. One writer at a time
holds the target's lock (``.NAME.lock``, which records its pid and host); the kernel drops the lock when its
holder dies, even by ``kill -9``, so whoever takes it next knows every hidden sibling was left by a dead run:
it puts a moved-aside folder back if the target is missing, and removes the rest, saying so in one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so a live writer cannot be told from a dead one (see `claimed`)
    fcntl = None

logger = logging.getLogger("transformers_sra")  # the package's logger, named rather than imported: no torch here
_HELD: set[str] = set()  # the targets this process holds the lock of, so nested writers share it


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


def _settle(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes ``mkdir`` and ``open`` would under the umask,
    and flush it to disk before it is renamed into place. `tempfile` makes folders 0700 and files 0600, and some
    writers (transformers' safetensors) make files 0600, which would hide the result from a serving process,
    another user or a shared team folder; the flush keeps a power cut from leaving a renamed but empty file."""
    mask = current_umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                _settle_one(os.path.join(root, name), 0o666 & ~mask)
            for name in dirs:
                _settle_one(os.path.join(root, name), 0o777 & ~mask)
        _settle_one(path, 0o777 & ~mask)
    else:
        _settle_one(path, 0o666 & ~mask)


def _settle_one(path: str | os.PathLike, mode: int) -> None:
    if not os.path.islink(path):
        os.chmod(path, mode)
        _fsync(path)


def _fsync(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on Windows; there its entries are flushed with their files
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot flush a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _hidden(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}"


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()[:64]}"


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(os.lstat(os.path.join(root, name)).st_size for root, _, files in os.walk(path) for name in files)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _size_text(n_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} bytes" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"


def _lock(target: Path, wait: bool) -> int:
    """Take ``target``'s lock file and return its descriptor; without ``wait``, a live holder is a one-line error."""
    lock = target.with_name(_hidden(target, "lock"))
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            raise ConfigError(f"cannot write beside {target} (permission denied); choose a folder you can write to") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{target} is being written by another run ({holder}); wait for it to finish or "
                              "write to another folder") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the last holder deleted this file after we opened it: take the new one
    pid, host = _owner().split("@", 1)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {pid} on {host}\n".encode())
    return fd


def _recover(target: Path) -> None:
    """Put right what killed writers left beside ``target``: a folder moved aside mid-swap goes back if the
    target is missing (else the swap had finished and it is the stale old result), and every other hidden
    temporary is deleted. The caller holds the lock, so none of these belongs to a live run."""
    old, tmp = _hidden(target, "old-"), _hidden(target, "tmp-")
    leftovers = sorted(p for p in target.parent.iterdir() if p.name.startswith((old, tmp)))
    for path in leftovers:
        if path.name.startswith(old) and not os.path.lexists(target):
            os.replace(path, target)
            logger.warning(f"put {target} back: a killed run had moved it aside to swap in its own result")
    removed = [p for p in leftovers if os.path.lexists(p)]
    if removed:
        freed = sum(_size(p) for p in removed)
        for path in removed:
            _remove(path)
        logger.warning(f"removed {len(removed)} hidden leftover{'s' * (len(removed) != 1)} of killed runs beside "
                       f"{target} ({', '.join(p.name for p in removed)}): {_size_text(freed)} freed")


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing, non-empty output folder unless ``overwrite``; cheap, so callers run it first."""
    target = Path(output_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ConfigError(f"output folder {target} exists and is not empty; choose another or pass --overwrite")
    return target


@contextmanager
def claimed(target: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
    """Hold ``target``'s lock for the block, so no other run writes it meanwhile (a live one is a `ConfigError`,
    or awaited with ``wait``); on taking it, leftovers of killed runs beside ``target`` are put right. Nested
    claims of one target in one process share the lock. Callers take it before long work, so a second run into
    the same output fails at once rather than at the end. Without advisory locks (Windows) there is no lock, and
    leftovers are left alone, since a live run's could not be told from a dead one's."""
    target = Path(target).absolute()
    key = str(target)
    if key in _HELD:  # the outer claim releases it
        yield target
        return
    made = [p for p in [target.parent, *target.parent.parents] if not p.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = None if fcntl is None else _lock(target, wait)
    _HELD.add(key)
    try:
        if fd is not None:
            _recover(target)
        yield target
    finally:
        _HELD.discard(key)
        if fd is not None:
            try:
                os.unlink(target.with_name(_hidden(target, "lock")))  # still held: a waiter that opened it retries
            finally:
                os.close(fd)
        for folder in made:  # a failed run leaves no empty folders it made for the lock
            try:
                folder.rmdir()
            except OSError:
                break


def _swap(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``. An existing target is moved aside first and deleted only once ``new`` is in
    place, so ``target`` never goes missing with its result lost: a failure or signal between the renames moves
    it back, and a kill there leaves it for the next writer's `_recover`."""
    old = target.with_name(_hidden(target, "old-") + _owner())
    try:
        if os.path.lexists(target):
            os.replace(target, old)
        os.replace(new, target)
    except BaseException:
        if os.path.lexists(old) and not os.path.lexists(target):
            os.replace(old, target)
        raise
    _fsync(target.parent)
    if os.path.lexists(old):
        _remove(old)


@contextmanager
def _temporary(target: Path, make: Callable[..., str]) -> Iterator[Path]:
    """A fresh hidden name beside ``target``, made by ``make(dir=, prefix=)``; afterwards every temporary of this
    process beside ``target`` is removed, the fresh one included even when a signal landed after the file system
    made it and before its name came back."""
    prefix = _hidden(target, "tmp-") + _owner() + "-"
    try:
        yield Path(make(dir=target.parent, prefix=prefix))
    finally:
        for path in target.parent.iterdir():
            if path.name.startswith(prefix):
                try:
                    _remove(path)
                except OSError:  # left for the next writer's `_recover`
                    pass


def _new_file(**where) -> str:
    fd, name = tempfile.mkstemp(**where)
    os.close(fd)
    return name


@contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = True, wait: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; if the block succeeds it replaces ``target``, otherwise it is
    removed, so ``target`` is never half-written nor missing (an interrupt or a kill included). The finished
    folder and its files get the permissions the umask asks for. Without ``overwrite`` a non-empty ``target`` is
    refused, checked again once the lock is held (a result a killed run had moved aside is back by then).
    ``wait``: see `claimed`::

        with atomic_folder(Path("out")) as tmp:
            model.save_pretrained(tmp)
    """
    with claimed(target, wait=wait) as target:
        check_output_dir(target, overwrite)
        with _temporary(target, tempfile.mkdtemp) as tmp:
            yield tmp
            _settle(tmp)
            _swap(tmp, target)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder to write; if the block succeeds the file is flushed to disk
    and renamed onto ``target`` (readers see the old file or the new one, never half of one), otherwise it is
    removed. Writers of one file take turns (`claimed` with ``wait``)::

        with atomic_file("results.json") as tmp:
            tmp.write_text(text)
    """
    with claimed(target, wait=True) as target, _temporary(target, _new_file) as tmp:
        yield tmp
        _settle(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` through `atomic_file`."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)

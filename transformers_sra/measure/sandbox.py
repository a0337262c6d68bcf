"""Run untrusted Python (model-written code and its tests) in a child process that cannot hurt the machine.

Each program gets its own process, session and empty temporary folder, and runs under:

* a wall-clock time limit, after which its whole process group is killed (SIGKILL);
* resource limits set before the program starts: CPU seconds, address space, file size;
* a cleared environment (``PATH``-free, ``HOME`` and ``TMPDIR`` point at its folder), Python in isolated mode;
* an audit hook (`sys.addaudithook`, which cannot be removed) that refuses, with ``PermissionError``: writing,
  deleting or renaming outside its folder, starting processes (fork, exec, spawn, ``os.system``, subprocess),
  signalling other processes, network connections and loading native code through ctypes.

A program passes only when it ends by reaching its last line: the runner prints a random token after the
program's code returns, so ``sys.exit()``, ``os._exit(0)``, a crash or a kill all read as failures::

    results = run_programs(["assert 1 + 1 == 2", "while True: pass"], timeout=3.0)
    [r.passed for r in results]   # [True, False]; results[1].status == "timeout"

This is defence in depth for honest-but-buggy code (the HumanEval setting), not a jail for hostile code: run
that in a container.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import ConfigError

MEMORY_BYTES = 1 << 30  # 1 GiB address space: HumanEval's tests need a few MB
FILE_BYTES = 1 << 20  # the largest file a program may write (in its own folder)

# Runs inside the child before the program: limits, the audit hook, then the program's code. argv[1] is the
# program file, argv[2..4] the limits; the pass token arrives on stdin, so it is in no file the program can read.
_RUNNER = r"""
import os, resource, sys
token = sys.stdin.readline().strip()
sys.stdin.close()
path, cpu, memory, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
root = os.path.realpath(os.path.dirname(path))
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
source = open(path, encoding="utf-8").read()
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PROCESS = {"os.system", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen",
           "os.kill", "os.killpg", "os.setsid", "pty.spawn", "socket.connect", "socket.bind", "ctypes.dlopen",
           "ctypes.dlsym", "ctypes.cdata", "os.startfile", "sys.remote_exec", "os.pidfd_open"}
PATHS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (0, 1),
         "os.chmod": (0,), "os.chown": (0,), "os.mkdir": (0,), "os.truncate": (0,), "os.utime": (0,),
         "shutil.rmtree": (0,), "shutil.move": (0, 1), "os.chdir": (0,)}
def inside(p):
    if isinstance(p, int):  # a file descriptor the program already holds
        return True
    return os.path.realpath(os.fsdecode(p)).startswith(root + os.sep) or os.path.realpath(os.fsdecode(p)) == root
def hook(event, args, inside=inside, PermissionError=PermissionError):
    if event in PROCESS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args[0] is not None:
        mode, flags = args[1] or "", args[2] or 0
        if (any(c in mode for c in "wax+") or flags & WRITE) and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox folder")
    elif event in PATHS and not all(inside(args[i]) for i in PATHS[event] if i < len(args) and args[i] is not None):
        raise PermissionError(f"sandbox: {event} outside the sandbox folder")
sys.addaudithook(hook)
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(source, path, "exec"), namespace)
sys.stdout.write("\n" + token + "\n")
sys.stdout.flush()
"""


ALLOW_ENV = "HF_ALLOW_CODE_EVAL"  # the opt-in variable of evaluate's code_eval


def require_code_execution(allowed: bool = False) -> None:
    """Raise unless running model-written code was asked for: ``allowed`` (``--allow-code-execution``) or
    ``HF_ALLOW_CODE_EVAL=1``."""
    if not (allowed or os.environ.get(ALLOW_ENV) == "1"):
        raise ConfigError("this task runs model-written code on this machine (sandboxed, but not a container); "
                          f"opt in with --allow-code-execution (Python: allow_code_execution=True) or {ALLOW_ENV}=1")


@dataclass
class Outcome:
    """How one program ended: ``status`` is "passed", "failed" (an exception, an exit, a signal) or "timeout"."""

    status: str
    detail: str = ""  # the last line of stderr, or why it was stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, timeout: float = 3.0) -> Outcome:
    """Run ``source`` in a fresh sandboxed process (see the module docstring) and say how it ended."""
    folder = tempfile.mkdtemp(prefix="sra-sandbox-")
    token = secrets.token_hex(16)
    try:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
        cpu = max(1, int(timeout) + 1)
        process = subprocess.Popen([sys.executable, "-I", "-B", "-c", _RUNNER, path, str(cpu), str(MEMORY_BYTES),
                                    str(FILE_BYTES)], cwd=folder, env=env, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = _communicate(process, token, timeout)
        finally:
            _kill_group(process)  # whatever it left running in its session goes with it
        if out is None:
            return Outcome("timeout", f"no result within {timeout:g} s")
        if process.returncode == 0 and out.rstrip().endswith(token):
            return Outcome("passed")
        last = err.strip().splitlines()[-1] if err.strip() else f"exit status {process.returncode}"
        return Outcome("failed", last[:300])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _communicate(process: subprocess.Popen, token: str, timeout: float) -> tuple[Optional[str], str]:
    """The program's stdout and stderr (bounded), or ``(None, "")`` when it overran ``timeout``."""
    try:
        out, err = process.communicate((token + "\n").encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    return out[-4096:].decode("utf-8", "replace"), err[-4096:].decode("utf-8", "replace")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_programs(sources: Sequence[str], timeout: float = 3.0, workers: Optional[int] = None) -> list[Outcome]:
    """`run_program` for each source, ``workers`` at a time (default: the CPU count), in input order."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each thread only waits on its child process
        return list(pool.map(lambda s: run_program(s, timeout), sources))

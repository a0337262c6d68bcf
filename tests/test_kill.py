"""A killed run loses nothing and leaves nothing (issue #33).

``sra ablate``, ``sra bake`` and ``sra export-adapter`` write over an earlier good result with ``--overwrite``
and are sent SIGKILL or SIGTERM when each stage line appears and at points inside the save (the hidden folder
appearing beside the output, then files appearing in it). After each kill the output is the old result byte for
byte or the complete new one; SIGTERM ends in one ``error:`` line, exit 143 and nothing written; and the next run
removes what a killed one left, saying so, and leaves nothing hidden behind itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import kill_child
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_CONFIGS
from test_cli import SMALL, _digest, _error_line, _save_tiny
from transformers_sra import SRAConfig
from transformers_sra.cli import main
from transformers_sra.errors import ConfigError
from transformers_sra.folders import atomic_folder, claimed

FORKS = multiprocessing.get_context("forkserver")
COMMANDS = ["ablate", "bake", "export_adapter"]
# what the runs would each import again on the way (the model's code, the card's figures)
PRELOAD = ["transformers.models.qwen2.modeling_qwen2", "transformers_sra.publish.hub", "transformers_sra.publish.figures",
           "matplotlib.pyplot", "jinja2", "peft"]


@pytest.fixture(scope="module")
def forks():
    # imported once by the server, not by every run (tests/ is not on the server's path: the package is)
    FORKS.set_forkserver_preload(["transformers_sra.cli", *(f"transformers_sra.cli.{name}" for name in COMMANDS),
                                  *PRELOAD])
    return FORKS


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny model, a small config and a good ``sra ablate`` result of them (its report feeds bake and export)."""
    root = tmp_path_factory.mktemp("kill")
    _save_tiny(root / "tiny")
    SRAConfig(**SMALL).save_pretrained(root / "cfg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_ablate_argv(root, root / "result")) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def _ablate_argv(root: Path, out: Path) -> list[str]:
    return ["ablate", "--model", str(root / "tiny"), "--config", str(root / "cfg"), "--direction-layer", "1",
            "--no-evaluate", "--output", str(out), "--overwrite"]


def _wider_checkpoint(root: Path) -> Path:
    """The tiny model's shape (so the ablate report fits) with wide MLPs and vocabulary, in 11 shards: a bake that
    takes long enough to be killed inside."""
    folder = root / "wide"
    if not folder.is_dir():
        torch.manual_seed(0)
        config = AutoConfig.for_model("qwen2", **dict(TINY_CONFIGS["qwen2"], intermediate_size=4096, vocab_size=8192))
        AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="2MB")
    return folder


def _argv(command: str, root: Path, out: Path) -> list[str]:
    if command == "ablate":
        return _ablate_argv(root, out)
    if command == "bake":
        return ["bake", "--model", str(_wider_checkpoint(root)), "--report", str(root / "result" / "sra_report.json"),
                "--output", str(out), "--overwrite"]
    return ["export-adapter", str(out), "--from", str(root / "result"), "--model", str(root / "tiny"), "--overwrite"]


# -- where to kill: a stage line on stderr, or the run's hidden folder (or a file in it) appearing ----------------
class Line:
    def __init__(self, text: str):
        self.text, self.name = text, f"line '{text}'"

    def seen(self, log: str, out: Path, pid: int) -> bool:
        return f"] {self.text}" in log


class Saving:
    def __init__(self, file: str | None = None):  # file: a name or a glob pattern
        self.file, self.name = file, f"saving {file}" if file else "hidden folder made"

    def seen(self, log: str, out: Path, pid: int) -> bool:
        for tmp in out.parent.glob(f".{out.name}.tmp-{pid}@*"):  # this run's, not one a killed run left
            if self.file is None or any(tmp.glob(self.file)):
                return True
        return False


POINTS = {
    "ablate": [Line("load "), Line("extract …"), Line("search …"), Line("bake …"), Line("save …"), Saving(),
               Saving("model.safetensors"), Saving("atom_orthogonality.png")],
    "bake": [Line("bake "), Saving(), Saving("model-00002-of-*.safetensors"),
             Saving("model-00008-of-*.safetensors")],
    "export-adapter": [Line("load "), Line("export the adapter"), Saving(), Saving("adapter_model.safetensors")],
}


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _complete(folder: Path, like: dict) -> bool:
    """A whole result: the files of a finished run, every JSON and safetensors file readable."""
    if not folder.is_dir() or sorted(p.name for p in folder.iterdir()) != sorted(like):
        return False
    for path in folder.iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                assert list(f.keys())
    return True


def _run(forks, argv: list[str], log: Path, out: Path, point=None, sig=None) -> tuple[int, str, int]:
    """``sra ARGV`` in a child; with a ``point``, send it ``sig`` the moment that point is seen."""
    child = forks.Process(target=kill_child.run_cli, args=(argv, str(log)))
    child.start()
    if point is not None:
        deadline = time.monotonic() + 120
        while not point.seen(log.read_text(errors="replace") if log.exists() else "", out, child.pid):
            assert child.is_alive(), f"the run ended before {point.name}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{point.name} never came:\n{log.read_text()[-3000:]}"
            time.sleep(0.001)
        os.kill(child.pid, sig)
    child.join(120)
    return child.exitcode, log.read_text(errors="replace"), child.pid


def _removed_line(log: str) -> str:
    lines = [line for line in log.splitlines() if "hidden leftover" in line]
    assert len(lines) <= 1, lines
    return lines[0] if lines else ""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("command", list(POINTS))
def test_a_killed_run_loses_nothing_and_the_next_run_clears_what_it_left(forks, made, tmp_path, command, sig):
    out = tmp_path / "out"
    if command == "ablate":  # the good earlier result: the same command's, made once for the module
        shutil.copytree(made / "result", out)
    else:
        code, log, _ = _run(forks, _argv(command, made, out), tmp_path / "first.log", out)
        assert code == 0, log
    like = _digest(out)
    left: list[str] = []  # what the last killed run left beside the output (its lock file aside)
    for n, point in enumerate(POINTS[command]):
        before = _digest(out)
        code, log, pid = _run(forks, _argv(command, made, out), tmp_path / f"kill{n}.log", out, point, sig)
        removed = _removed_line(log)
        assert all(name in removed for name in left) and bool(removed) == bool(left), (point.name, removed, left)
        after = _digest(out) if out.is_dir() else None
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, (point.name, code, log[-3000:])
            assert after == before or _complete(out, like), (point.name, sorted(after or ()))
        else:  # a scheduler's time limit: one line, exit 143, nothing written and nothing left
            assert code == 143, (point.name, code, log[-3000:])
            assert _error_line(log).startswith("error: terminated (SIGTERM);"), (point.name, log[-3000:])
            assert after == before, point.name
            assert _hidden(out) == [], (point.name, _hidden(out))
        left = [name for name in _hidden(out) if not name.endswith(".lock")]
        if sig == signal.SIGKILL and isinstance(point, Saving):  # killed inside the save: its hidden folder stays
            assert any(name.startswith(f".out.tmp-{pid}@") for name in left), (point.name, left)
    code, log, _ = _run(forks, _argv(command, made, out), tmp_path / "last.log", out)
    assert code == 0 and all(name in _removed_line(log) for name in left), log[-3000:]
    assert bool(_removed_line(log)) == bool(left) and _complete(out, like) and _hidden(out) == []


def test_sigterm_through_the_real_command_is_one_line_and_exit_143(made, tmp_path):
    """The entry point itself, as a scheduler would stop it: ``python -m transformers_sra`` gets SIGTERM mid-save."""
    out = tmp_path / "out"
    shutil.copytree(made / "result", out)
    before = _digest(out)
    child = subprocess.Popen([sys.executable, "-m", "transformers_sra", *_ablate_argv(made, out)], stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in child.stderr:
        lines.append(line)
        if "] save …" in line:
            child.send_signal(signal.SIGTERM)
    assert child.wait(60) == 143, "".join(lines)
    assert _error_line("".join(lines)).startswith(f"error: terminated (SIGTERM); {made / 'tiny'} is untouched")
    assert _digest(out) == before and _hidden(out) == []


def test_sigterm_that_a_library_turns_into_another_exception_is_still_143(made, tmp_path, monkeypatch, capsys):
    """Raised inside a C call (safetensors' save in CI), `Terminated` can come back as a TypeError: still exit 143."""
    from transformers_sra.cli import bake

    def interrupted_save(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except BaseException:
            raise TypeError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        return 0

    monkeypatch.setattr(bake, "run", interrupted_save)
    assert main(_argv("bake", made, tmp_path / "out")) == 143
    assert _error_line(capsys.readouterr().err).startswith("error: terminated (SIGTERM);")
    monkeypatch.setattr(bake, "run", lambda args: 1 / 0)  # the flag does not outlive its run
    assert main(_argv("bake", made, tmp_path / "out")) == 1


def test_a_second_run_into_a_live_runs_output_is_one_line_and_touches_nothing(forks, made, tmp_path, capsys):
    out, ready = tmp_path / "out", tmp_path / "ready"
    holder = forks.Process(target=kill_child.hold, args=(str(out), str(ready)))
    holder.start()
    try:
        while not ready.exists():
            assert holder.is_alive()
            time.sleep(0.01)
        held = _hidden(out)
        assert main(_ablate_argv(made, out)) == 2
        err = _error_line(capsys.readouterr().err)
        assert err.startswith(f"error: {out} is being written by another run (pid {holder.pid} on ") and \
            "wait for it to finish" in err, err
        assert _hidden(out) == held and not out.exists()  # its lock and its half-written folder, untouched
    finally:
        holder.kill()
        holder.join()
    with claimed(out):  # the holder is dead now: its folder goes, with what it freed
        pass
    assert _hidden(out) == [] and not out.exists()


# -- the swap: the old result is never deleted before the new one is in place --------------------------------
def _old_result(out: Path) -> dict:
    out.mkdir()
    (out / "result.txt").write_text("old")
    (out / "weights.bin").write_bytes(os.urandom(3000))
    return _digest(out)


def test_a_failure_between_the_two_renames_puts_the_old_result_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = _old_result(out)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the new folder onto the target, after the old one was moved aside
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_folder(out) as tmp:
            (tmp / "result.txt").write_text("new")
    assert calls[0][0] == "out" and calls[0][1].startswith(".out.old-") and calls[1][1] == "out"
    assert _digest(out) == old and _hidden(out) == []


@pytest.mark.parametrize("renames", [1, 2], ids=["after moving the old aside", "after moving the new in"])
def test_a_crash_inside_the_swap_is_put_right_by_the_next_writer(forks, tmp_path, caplog, renames):
    out = tmp_path / "out"
    old = _old_result(out)
    child = forks.Process(target=kill_child.crash_mid_swap, args=(str(out), renames))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    aside = [name for name in _hidden(out) if name.startswith(".out.old-")]
    assert len(aside) == 1 and (out.exists() == (renames == 2))
    with caplog.at_level(logging.WARNING, logger="transformers_sra"):
        if renames == 1:  # a writer without overwrite finds the old result back in place, and refuses it
            with pytest.raises(ConfigError, match="exists and is not empty"), atomic_folder(out, overwrite=False):
                pass
        else:
            with claimed(out):
                pass
    now = _digest(out)
    if renames == 1:  # the old result was only moved aside: it is put back, byte for byte
        assert now == old and "put " in caplog.text and f"{out} back" in caplog.text
    else:  # the new one was in place: the old is stale and goes
        assert now == {"result.txt": hashlib.sha256(b"new").hexdigest()} and aside[0] in caplog.text
    assert _hidden(out) == []


def test_a_live_claim_is_never_cleaned_and_a_dead_ones_leftovers_are_reported(forks, tmp_path, caplog):
    out, ready = tmp_path / "out", tmp_path / "ready"
    holder = forks.Process(target=kill_child.hold, args=(str(out), str(ready)))
    holder.start()
    while not ready.exists():
        assert holder.is_alive()
        time.sleep(0.01)
    held = _hidden(out)
    with pytest.raises(ConfigError, match=f"pid {holder.pid} on "):
        with claimed(out):
            pass
    assert _hidden(out) == held  # a live run's folder is never touched
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with caplog.at_level(logging.WARNING, logger="transformers_sra"):
        with atomic_folder(out) as tmp:
            (tmp / "result.txt").write_text("new")
    [tmp_name] = [name for name in held if ".tmp-" in name]
    assert f"removed 1 hidden leftover of killed runs beside {out} ({tmp_name}): 5.0 KB freed" in caplog.text
    assert _hidden(out) == [] and _digest(out) == {"result.txt": hashlib.sha256(b"new").hexdigest()}


# -- files: temporary beside, flushed, renamed ----------------------------------------------------------------
def test_a_file_is_replaced_whole_and_a_dead_writers_temporary_is_removed(tmp_path, caplog):
    from transformers_sra.folders import atomic_file, write_text_atomic

    target = tmp_path / "results.json"
    target.write_text("old")
    stale = tmp_path / ".results.json.tmp-999999@elsewhere-abc"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"x" * 2500)
    old_umask = os.umask(0o022)
    try:
        with pytest.raises(RuntimeError), atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
        assert target.read_text() == "old" and _hidden(target) == []
        assert "removed 1 hidden leftover of killed runs" in caplog.text and "2.5 KB freed" in caplog.text
        write_text_atomic(target, "new")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "new" and _hidden(target) == []
    assert target.stat().st_mode & 0o777 == 0o644  # mkstemp's 0600 would hide it from other readers


def test_an_evaluation_cache_entry_that_fails_mid_write_is_absent_not_torn(tmp_path, monkeypatch):
    from transformers_sra.measure import evaluation
    from transformers_sra.measure.evaluation import Evaluation

    entry = Evaluation({"refusal_rate": 0.5}, harmless_logprobs=torch.zeros(2, 3))

    def torn(tensors, path, **kwargs):
        Path(path).write_bytes(b"half a header")
        raise OSError("no space left on device")

    monkeypatch.setattr(evaluation, "save_file", torn)
    with pytest.raises(OSError, match="no space"):
        entry.save(tmp_path / "refusal-abc")
    assert list(tmp_path.iterdir()) == []  # no JSON marker, so the next run measures again; no temporaries
    monkeypatch.undo()
    entry.save(tmp_path / "refusal-abc")
    loaded = Evaluation.load(tmp_path / "refusal-abc")
    assert loaded.metrics == {"refusal_rate": 0.5} and torch.equal(loaded.harmless_logprobs, torch.zeros(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refusal-abc.json", "refusal-abc.safetensors"]


def test_an_output_beside_which_nothing_can_be_written_is_one_clear_error(tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, *args, **kwargs):  # what a read-only folder answers (root, running the tests, is never denied)
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ConfigError, match=r"cannot write beside .*out \(permission denied\); choose a folder"):
        with atomic_folder(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []

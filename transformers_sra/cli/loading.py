"""Load a model and tokenizer for a subcommand: a Hub id or folder, a GGUF file, or the demo model."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Optional, Union

import torch

from ..demo import DEMO_DTYPE
from ..distributed import rank_device
from ..errors import SRAError
from ..progress import stage

# x86 flags that mean the CPU multiplies this dtype in hardware; without them PyTorch converts every tile to
# fp32 and back, about 3x slower than fp32 itself (measured on an AVX2 machine).
NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def cpu_flags() -> Optional[set]:
    """The x86 CPU's feature flags from /proc/cpuinfo, or None elsewhere (macOS, ARM, no procfs)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), None)


def matmul_seconds(dtype: torch.dtype, shape: tuple[int, int, int] = (256, 256, 256), seconds: float = 0.025,
                   clock=time.perf_counter) -> float:
    """Mean seconds of one ``(m, k) @ (k, n)`` matmul in ``dtype``, repeated for about ``seconds`` after a warm-up
    (kernel selection); ``benchmarks/dtype_speed.py`` times the docs' figures with it too."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    count, start = 0, clock()
    while clock() - start < seconds or count == 0:
        a @ b
        count += 1
    return (clock() - start) / count


def _faster_than_fp32(dtype: torch.dtype, seconds: float = 0.01, rounds: int = 3) -> bool:
    """A micro-benchmark of about ``2 * rounds * seconds``: does a 256x256 matmul in ``dtype`` keep up with fp32 on
    this CPU? Timed on one thread in that thread's CPU seconds, each dtype's best of ``rounds`` alternating rounds,
    so other processes on a busy machine do not decide it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matmul then runs in this thread, which thread_time counts alone
    try:
        best = {dt: float("inf") for dt in (dtype, torch.float32)}
        for _ in range(rounds):
            for dt in best:
                best[dt] = min(best[dt], matmul_seconds(dt, seconds=seconds, clock=time.thread_time))
    finally:
        torch.set_num_threads(threads)
    return best[dtype] <= best[torch.float32]


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` in hardware. x86 flags without the extension settle it (no); otherwise
    a micro-benchmark does: with the flags present, torch may still be held to older kernels (``ONEDNN_MAX_CPU_ISA``,
    ``ATEN_CPU_CAPABILITY``: a bf16 matmul then costs 50-80x an fp32 one), and without flags (ARM, macOS) it is the
    only evidence."""
    flags = cpu_flags()
    if flags is not None and not any(flag in flags for flag in NATIVE_FLAGS[dtype]):
        return False
    return _faster_than_fp32(dtype)


def compute_dtype(saved: torch.dtype, device_map: Optional[str] = None) -> torch.dtype:
    """The dtype to compute in for a checkpoint saved in ``saved``: its own on a GPU or on a CPU that runs it
    natively, else fp32 (a half-precision matmul emulated on the CPU costs more than fp32's)."""
    on_cpu = device_map_for(device_map) in (None, "cpu") or not accelerator_present()
    if saved not in NATIVE_FLAGS or not on_cpu or cpu_computes_natively(saved):
        return saved
    return torch.float32


def checkpoint_dtype(name: Optional[str], gguf_file: Optional[str] = None,
                     trust_remote_code: bool = False) -> Optional[torch.dtype]:
    """The dtype the checkpoint is stored in (from its config), or None when it does not say (GGUF)."""
    if name is None:
        return DEMO_DTYPE
    if gguf_file:
        return None  # dequantized on load: transformers' own choice stands
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name, err) from None
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _load_error(name: str, err: Exception) -> SRAError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return SRAError(f"cannot load model {name!r}: {first}; check the id or folder (and --gguf-file)")


def resolve_dtypes(name: Optional[str], dtype: str = "auto", *, gguf_file: Optional[str] = None,
                   device_map: Optional[str] = None, trust_remote_code: bool = False):
    """``(compute, save)`` dtypes: an explicit ``dtype`` is both; ``auto`` saves in the checkpoint's own dtype
    and computes in it too unless this CPU would emulate it (`compute_dtype`). None: transformers decides."""
    if dtype != "auto":
        return (getattr(torch, dtype),) * 2
    saved = checkpoint_dtype(name, gguf_file, trust_remote_code)
    return (None, None) if saved is None else (compute_dtype(saved, device_map), saved)


def accelerator_present() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def device_map_for(device_map: Optional[str]) -> Optional[str]:
    """The user's choice, else ``auto`` (accelerate spreads the layers) when a GPU is present, else the CPU.
    Under a multi-GPU torchrun launch the default is one whole copy per rank, on the rank's own GPU."""
    if device_map is None and rank_device() is not None:
        return rank_device()
    if device_map is None:
        return "auto" if accelerator_present() else None
    return None if device_map.lower() in ("none", "") else device_map


def check_model_source(name: Optional[str]) -> None:
    """A name that is plainly a path must exist; caught before anything is loaded."""
    if name and name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise SRAError(f"model folder {name} does not exist; pass an existing folder or a Hub id like org/name")


def load_model(name: Optional[str], *, gguf_file: Optional[str] = None, dtype: Union[str, torch.dtype] = "auto",
               device_map: Optional[str] = None, trust_remote_code: bool = False):
    """``(model, tokenizer)`` in eval mode, computing in `resolve_dtypes`'s compute dtype (or ``dtype`` given as
    a torch dtype); errors become one `SRAError` line that names what to check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(name)
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtypes(name, dtype, gguf_file=gguf_file, device_map=device_map,
                               trust_remote_code=trust_remote_code)[0] or "auto"
    device_map = device_map_for(device_map)
    with stage(f"load {name or 'the demo model'} ({str(dtype).replace('torch.', '')})"):
        if name is None:
            from ..demo import load_demo_model

            kwargs = {"device_map": device_map} if device_map else {}
            return load_demo_model(dtype=dtype, **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                name, gguf_file=gguf_file, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, EnvironmentError) as err:
            raise _load_error(name, err) from None
    model.eval()
    return model, tokenizer

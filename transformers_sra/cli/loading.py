"""Load a model and tokenizer for a subcommand: a Hub id or folder, a GGUF file, or the demo model."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..distributed import rank_device
from ..errors import SRAError
from ..progress import stage

#: Qwen2.5's own checkpoints are bf16; the demo's cached copy is fp32 only because the GGUF is dequantized.
DEMO_DTYPE = torch.bfloat16


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


def load_model(name: Optional[str], *, gguf_file: Optional[str] = None, dtype: str = "auto",
               device_map: Optional[str] = None, trust_remote_code: bool = False):
    """``(model, tokenizer)`` in eval mode; errors become one `SRAError` line that names what to check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(name)
    device_map = device_map_for(device_map)
    with stage(f"load {name or 'the demo model'}"):
        if name is None:
            from ..demo import load_demo_model

            kwargs = {"device_map": device_map} if device_map else {}
            return load_demo_model(dtype=DEMO_DTYPE if dtype == "auto" else getattr(torch, dtype), **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                name, gguf_file=gguf_file, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                device_map=device_map, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, EnvironmentError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SRAError(f"cannot load model {name!r}: {first}; check the id or folder (and --gguf-file)") from None
    model.eval()
    return model, tokenizer

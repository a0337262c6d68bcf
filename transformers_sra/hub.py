"""Write the ablated model's output folder atomically: weights, tokenizer, ``sra_config.json``, report.

Everything is written into a hidden sibling folder first and renamed into place at the end, so an error
or an interrupt never leaves a half-written output folder::

    save_cleaned(model, tokenizer, report, "qwen-sra/")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .config import SRAConfig
from .errors import ConfigError
from .report import SRAReport


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing, non-empty output folder unless ``overwrite``; cheap, so callers run it first."""
    target = Path(output_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ConfigError(f"output folder {target} exists and is not empty; choose another or pass --overwrite")
    return target


def save_cleaned(model, tokenizer, report: SRAReport, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a normal transformers checkpoint plus ``sra_config.json`` and ``sra_report.json``."""
    target = check_output_dir(output_dir, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        # A GGUF-loaded model is already dequantized; transformers refuses to save it until this is dropped.
        quantizer.remove_quantization_config(model)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        SRAConfig.from_dict(report.config).save_pretrained(tmp)
        report.save(tmp / "sra_report.json")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

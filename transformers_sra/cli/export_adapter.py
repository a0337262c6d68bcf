"""``sra export-adapter OUT_DIR --from qwen-sra/``: the edit of an ``sra ablate`` folder as a PEFT LoRA adapter.

The report (``sra_report.json`` in the folder, or ``--from FILE``) says which directions were baked and from
which base model; the base is loaded (``--model`` overrides it), the edit is baked again to read its factors,
and the adapter folder is written atomically. Nothing is written if the edit cannot be held exactly.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..folders import claimed
from ..progress import stage
from . import summary
from .loading import load_model


@dataclass
class ExportAdapterArguments:
    _argument_group_name = "export-adapter"
    report: str = field(metadata={"help": "An sra ablate output folder, or its sra_report.json.",
                                  "metavar": "DIR_OR_FILE", "aliases": ["--from"]})
    model: Optional[str] = field(default=None, metadata={
        "help": "The unedited base model, id or folder (default: the one the report names).", "metavar": "ID_OR_DIR"})
    base_model: Optional[str] = field(default=None, metadata={
        "help": "Hub id written as base_model in the adapter's config and card (default: inferred).", "metavar": "REPO"})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output folder (once the new one is complete)."})
    card: bool = field(default=True, metadata={"help": "Leave out the adapter's README.md card."})
    full_modules: bool = field(default=False, metadata={
        "help": "Where no LoRA layer can hold the edit (bare biases, expert tensors peft cannot wrap), carry the modules "
                "that own it whole (peft modules_to_save): exact, but as large as those modules."})


def _report(source: str):
    from ..report import REPORT_NAME, SRAReport

    path = Path(source)
    file = path / REPORT_NAME if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{source} is neither an sra ablate output folder nor a report file (no {file.name} found)")
    try:
        return SRAReport.load(file)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"cannot read the report {file}: {' '.join(str(err).split())[:160]}") from None


def run(args: argparse.Namespace) -> int:
    from ..publish.adapter import check_adapter_dependencies
    from ..publish.hub import check_output_dir

    check_adapter_dependencies()
    check_output_dir(args.output, args.overwrite)
    with claimed(args.output):  # a second run into the same folder fails now, not after loading the model
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from ..publish.adapter import ADAPTER_WEIGHTS, export_adapter

    report = _report(args.report)
    base = args.model or report.model_name
    if not base:
        raise ConfigError("the report does not name its base model; pass --model ID_OR_DIR")
    model, _ = load_model(base, dtype=args.dtype, device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    with stage(f"export the adapter to {args.output}"):
        folder = export_adapter(report, model, args.output, overwrite=args.overwrite, card=args.card,
                                base_model=args.base_model, full_modules=args.full_modules)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    size_mb = (folder / ADAPTER_WEIGHTS).stat().st_size / 1e6
    modules = config.get("target_modules") or []  # a string only as peft's placeholder when there is no LoRA layer
    targets = (0 if isinstance(modules, str) else len(modules)) + len(config.get("target_parameters") or [])
    full = len(config.get("modules_to_save") or [])
    result = {"command": "export-adapter", "output": str(folder), "base_model": config["base_model_name_or_path"],
              "rank": config["r"], "targets": targets, "full_modules": full, "size_mb": round(size_mb, 3)}
    text = summary.pairs([("adapter", str(folder)), ("base model", result["base_model"]), ("rank", config["r"]),
                          ("writers", targets), ("full modules", full), ("size", f"{size_mb:.2f} MB")])
    summary.emit(result, text, args.json)
    return 0

"""``sra audit``: the atom orthogonality audit and the per-layer sweep, with figures; the model is not edited."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from ..errors import ConfigError
from ..folders import atomic_folder
from ..progress import logger
from . import summary
from .args import config_from
from .loading import load_model


@dataclass
class AuditArguments:
    _argument_group_name = "audit"
    output: str = field(default="sra-audit", metadata={"help": "Folder for audit.json and the figures (replaced if it exists).",
                                                         "metavar": "DIR"})
    config: Optional[str] = field(default=None, metadata={"help": "An SRAConfig as JSON or YAML; flags override it.",
                                                                 "metavar": "FILE"})
    sweep: bool = field(default=True, metadata={"help": "Only the cosines: skip scoring the clean direction of every "
                                                                "candidate layer (hooks, no edit)."})
    layer: Optional[int] = field(default=None, metadata={"help": "Layer whose cosine matrix is printed (default: the "
                                                                  "sweep's best, else the middle candidate).",
                                                                  "metavar": "N"})


def run(args: argparse.Namespace) -> int:
    from ..method.audit import audit_model

    config = config_from(args)
    target = Path(args.output)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--output {target} is a file; pass a folder")
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device_map=args.device_map,
                                  trust_remote_code=args.trust_remote_code)
    audit = audit_model(model, tokenizer, config, sweep=args.sweep)
    layers = audit["layers"]
    layer = next(x for x in (args.layer, audit["best_layer"], layers[len(layers) // 2]) if x is not None)
    if layer not in audit["cosine"]:
        raise ConfigError(f"--layer {layer} is not a candidate layer; the audit covered {layers}")
    figures = _save(audit, target, layer)
    result = {"command": "audit", "output": str(target), "layer": layer, "figures": figures, **audit}
    text = [f"cosines at layer {layer} (dirty/clean: refusal directions; roles: "
            + ", ".join(f"{n} {r}" for n, r in audit["roles"].items()) + ")",
            summary.table([""] + audit["names"], [[n] + [f"{c:+.2f}" for c in row]
                                                   for n, row in zip(audit["names"], audit["cosine"][layer])])]
    if audit["sweep"]:
        text += ["", f"layer sweep: clean direction, fluency rank {audit['fluency_rank']}; base refusal score "
                     f"{audit['base_refusal_score']:.3f}; budgets KL ≤ {audit['budgets']['max_kl']}, "
                     f"ΔPPL ≤ {summary.percent(audit['budgets']['max_ppl_increase'])}",
                 summary.table(["layer", "refusal score", "KL", "ΔPPL", "explained by atoms", "feasible"],
                               [(r["layer"], r["refusal_score"], r["kl"], summary.percent(r["ppl_change"]),
                                 f"{r['explained_share']:.0%}", "yes" if r["feasible"] else "no")
                                for r in audit["sweep"]])]
    text += ["", f"saved: {target / 'audit.json'}" + "".join(f", {f}" for f in figures)]
    summary.emit(result, "\n".join(text), args.json)
    return 0


def _save(audit: dict, target: Path, layer: int) -> list[str]:
    """audit.json and the figures, written into a sibling folder and renamed into place."""
    with atomic_folder(target) as tmp:
        (tmp / "audit.json").write_text(json.dumps(audit, indent=1), encoding="utf-8")
        names = _figures(audit, tmp, layer)
    return [str(target / n) for n in names]


def _figures(audit: dict, folder: Path, layer: int) -> list[str]:
    """The card's own heatmap and sweep figures (`figures.py`), drawn from the audit instead of a report."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        logger.info("figures skipped: pip install 'transformers-sra[card]' for matplotlib")
        return []
    from ..publish.figures import FIGURES, layer_sweep, orthogonality_heatmap

    view = SimpleNamespace(atom_audit={"names": audit["names"], "cosine": audit["cosine"][layer], "layer": layer},
                           direction_layer=layer, search=audit["sweep"], config=audit["budgets"],
                           validation={"base_refusal_score": audit["base_refusal_score"]})
    orthogonality_heatmap(view, folder / FIGURES["orthogonality"])
    out = [FIGURES["orthogonality"]]
    if audit["sweep"]:
        layer_sweep(view, folder / FIGURES["layer_sweep"])
        out.append(FIGURES["layer_sweep"])
    return out

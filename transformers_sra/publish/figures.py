"""The model card's three figures, drawn from an `SRAReport` (no model needed)::

    write_figures(report, "qwen-sra/")   # {"orthogonality": "atom_orthogonality.png", ...}

* ``atom_orthogonality.png``: |cosine| between the dirty and clean directions and every atom;
* ``layer_sweep.png``: the search's layer sweep, validation refusal score and first-token KL by layer;
* ``refusal_vs_kl.png``: judged refusal rate (95% interval) against first-token KL for base, standard
  ablation and SRA (from ``report.metrics``; the validation search table when no evaluation ran).

Drawn with matplotlib's object API on the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..labels import LABELS as _LABELS

FIGURES = {"orthogonality": "atom_orthogonality.png", "layer_sweep": "layer_sweep.png",
           "frontier": "refusal_vs_kl.png"}
_COLORS = {"base": "#555555", "standard": "#d62728", "standard_filtered": "#ff7f0e", "rank1": "#9467bd",
           "sra": "#1f77b4"}


def _figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def orthogonality_heatmap(report, path: str | os.PathLike) -> None:
    names, cos = report.atom_audit["names"], report.atom_audit["cosine"]
    n = len(names)
    fig = _figure(1.2 + 0.55 * n, 0.9 + 0.5 * n)
    ax = fig.add_subplot()
    values = [[abs(v) for v in row] for row in cos]
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{values[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if values[i][j] > 0.6 else "white")
    ax.set_title(f"|cosine| between directions and atoms, layer {report.atom_audit.get('layer', report.direction_layer)}")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path)


def layer_sweep(report, path: str | os.PathLike) -> None:
    # The first coordinate pass scores every layer at the first rank and profile: that is the layer sweep.
    first = report.search[0]
    rows = sorted((r for r in report.search if r["rank"] == first["rank"] and r["profile"] == first["profile"]),
                  key=lambda r: r["layer"])
    layers = [r["layer"] for r in rows]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(layers, [r["refusal_score"] for r in rows], "o-", color=_COLORS["sra"], label="refusal score")
    base = report.validation.get("base_refusal_score")
    if base is not None:
        ax.axhline(base, color=_COLORS["base"], ls=":", label="base refusal score")
    ax.set_xlabel("direction layer")
    ax.set_xticks(layers)
    ax.set_ylabel("validation refusal score (first-token mass)")
    kl_ax = ax.twinx()
    kl_ax.plot(layers, [r["kl"] for r in rows], "s--", color=_COLORS["standard"], label="first-token KL")
    max_kl = report.config.get("max_kl")
    if max_kl is not None:
        kl_ax.axhline(max_kl, color=_COLORS["standard"], ls=":", lw=1, label="KL budget")
    kl_ax.set_ylabel("first-token KL(base ‖ edited)")
    ax.axvline(report.direction_layer, color="#2ca02c", alpha=0.4, lw=6, label="chosen layer")
    handles = ax.get_legend_handles_labels()
    more = kl_ax.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="best")
    ax.set_title("Layer sweep on validation prompts")
    fig.savefig(path)


def refusal_vs_kl(report, path: str | os.PathLike) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    measured = {k: report.metrics[k]["metrics"] for k in _LABELS
                if isinstance(report.metrics.get(k), dict) and "refusal_rate" in report.metrics[k].get("metrics", {})}
    if measured:
        for name, m in measured.items():
            kl = m.get("first_token_kl", 0.0)
            lo, hi = m.get("refusal_rate_ci95", [m["refusal_rate"]] * 2)
            ax.errorbar([kl], [m["refusal_rate"]], yerr=[[m["refusal_rate"] - lo], [hi - m["refusal_rate"]]], fmt="o",
                        ms=9, capsize=5, color=_COLORS[name], label=_LABELS[name])
        ax.set_ylabel("refusal rate on held-out harmful prompts (95% CI)")
        ax.set_xlabel("first-token KL(base ‖ model) on held-out harmless prompts")
        ax.set_title("Refusal against collateral change (test split)")
    else:  # no evaluation ran: the search's own validation numbers
        ax.scatter([r["kl"] for r in report.search], [r["refusal_score"] for r in report.search], color="#999999",
                   label="search candidates")
        chosen = report.chosen
        ax.scatter([chosen["kl"]], [chosen["refusal_score"]], s=90, color=_COLORS["sra"], label="SRA (chosen)")
        ax.scatter([0.0], [report.validation.get("base_refusal_score", 0.0)], s=90, color=_COLORS["base"],
                   label="base model")
        ax.set_ylabel("validation refusal score")
        ax.set_xlabel("first-token KL(base ‖ model), validation")
        ax.set_title("Refusal against collateral change (validation)")
    max_kl = report.config.get("max_kl")
    if max_kl is not None:
        ax.axvline(max_kl, color="#999999", ls=":", label="KL budget")
    ax.set_ylim(0, 1.05 if measured else None)
    ax.margins(x=0.08)
    ax.legend(fontsize=8)
    fig.savefig(path)


def write_figures(report, folder: str | os.PathLike) -> dict:
    """Draw the three PNGs into ``folder``; returns {figure: file name}."""
    folder = Path(folder)
    orthogonality_heatmap(report, folder / FIGURES["orthogonality"])
    layer_sweep(report, folder / FIGURES["layer_sweep"])
    refusal_vs_kl(report, folder / FIGURES["frontier"])
    return dict(FIGURES)

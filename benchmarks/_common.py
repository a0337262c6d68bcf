"""What the benchmarks share: the model they load (the demo model, or a tiny random one for a smoke run), where they
ran, and the refusal/KL plot. Benchmark scripts import it as ``from _common import ...`` (benchmarks/ is the
script's folder)."""

from __future__ import annotations

import os

import torch

from transformers_sra import SRAConfig, load_demo_model
from transformers_sra.testing import TINY_RUN, make_tiny_model, make_tokenizer


def load(name: str):
    """The demo model in fp32, or (``"tiny"``) a random tiny model for a smoke run."""
    if name != "tiny":
        return load_demo_model(dtype=torch.float32)
    return make_tiny_model("qwen2"), make_tokenizer()


def machine_info(device: str) -> dict:
    """Where a benchmark ran, for its results record (the model is fp32 everywhere)."""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "dtype": "float32"}


def cpu_flags_record() -> list:
    """The CPU flags that decide how fast bf16 and fp32 run, for a results record (sorted; empty off x86)."""
    from transformers_sra.cli.loading import cpu_flags

    return sorted((cpu_flags() or set()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})


def tiny_config(iterations: int) -> SRAConfig:
    """The `SRAConfig` of a smoke run on the tiny model, with ``iterations`` mining passes."""
    return SRAConfig(**{**TINY_RUN, "iterations": iterations})


STYLES = {"base": ("black", "s", "base"),
          "standard": ("tab:red", "o", "standard ablation (unfiltered training prompts)"),
          "standard_filtered": ("tab:orange", "o", "standard ablation, filtered direction"),
          "rank1_flat": ("tab:blue", "o", "SRA rank 1, flat γ"),
          "rank1_tent": ("tab:blue", "o", "SRA rank 1, the default tent scaled"),
          "rank_k": ("tab:purple", "D", "SRA rank k (judged mining)"),
          "rank2_answered": ("tab:purple", "D", "SRA rank 2: + mined direction vs answered prompts"),
          "rank2_harmless": ("tab:pink", "D", "SRA rank 2: + mined direction vs harmless prompts"),
          "sra_default": ("tab:green", "*", "SRA default (searched)"),
          "read_side": ("tab:cyan", "^", "SRA rank 1 + read side (q/k/v, gate/up) after its layer"),
          "read_side_only": ("tab:olive", "^", "read side only"),
          "discriminative": ("tab:brown", "v", "SRA rank 1 on the separating layers only"),
          "cone": ("tab:gray", "P", "SRA rank 1 + a second direction (cone)"),
          "per_layer": ("tab:purple", "X", "each late layer's own direction, the tent scaled")}
# methods whose points are one knob turned (drawn as a line); the others are separate edits (markers only)
CURVES = {"standard", "standard_filtered", "rank1_flat", "rank1_tent", "rank_k", "per_layer"}


def plot(rows, path, title: str = "Refusal vs KL, test split", sets: tuple = ("harmful_test", "harmless_test")) -> None:
    """Refused share (95% CI) against first-token KL, one line per ``row["method"]`` (see `STYLES`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, (color, marker, label) in STYLES.items():
        pts = sorted((r for r in rows if r.get("method") == method), key=lambda r: r.get("first_token_kl", 0.0))
        if not pts:
            continue
        x = [r.get("first_token_kl", 0.0) for r in pts]
        y = [100 * r["refusal_rate"]["rate"] for r in pts]
        err = [[100 * (r["refusal_rate"]["rate"] - r["refusal_rate"]["ci95"][0]) for r in pts],
               [100 * (r["refusal_rate"]["ci95"][1] - r["refusal_rate"]["rate"]) for r in pts]]
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, markersize=10 if marker == "*" else 6, capsize=3,
                    linestyle="-" if len(pts) > 1 and method in CURVES else "none", label=label)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel(f"first-token KL on {sets[1]} (lower is better)")
    ax.set_ylabel(f"refused on {sets[0]}, % (95% CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

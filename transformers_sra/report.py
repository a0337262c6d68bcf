"""`SRAReport`: what `apply_surgical_ablation` did, JSON round-trippable, with ``undo()``.

::

    report = apply_surgical_ablation(model, tokenizer)
    report.save("sra_report.json")
    SRAReport.load("sra_report.json").direction_layer
    report.undo()   # the model's weights as they were (only on the live report)
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch

from .errors import SRAError, UndoError
from .folders import write_text_atomic

REPORT_NAME = "sra_report.json"


def peak_rss(children: bool = False) -> int:
    """Peak resident set in bytes: this process's own (Linux: VmHWM), or with ``children`` the largest of it and of
    every child process waited for (what GNU time reports for a whole command). Not ``ru_maxrss`` for this process:
    Linux starts a child's at the RSS of the process that spawned it, so a benchmark's child would report its parent's
    model. A child's figure can carry its parent's RSS only, which the parent's own peak already bounds."""
    def maxrss(who: int) -> int:
        kib = resource.getrusage(who).ru_maxrss  # KiB on Linux, bytes on macOS
        return kib if sys.platform == "darwin" else kib * 1024

    own = None
    try:
        own = next((int(line.split()[1]) * 1024 for line in open("/proc/self/status", encoding="ascii")
                    if line.startswith("VmHWM:")), None)
    except OSError:
        pass
    own = maxrss(resource.RUSAGE_SELF) if own is None else own  # no procfs (macOS)
    return max(own, maxrss(resource.RUSAGE_CHILDREN)) if children else own


def peak_memory() -> dict:
    """Peak resident memory of this process (`peak_rss`) and peak GPU memory allocated, in MiB."""
    out = {"ram_mib": round(peak_rss() / (1 << 20))}
    if torch.cuda.is_available():
        out["gpu_mib"] = round(torch.cuda.max_memory_allocated() / (1 << 20))
    return out


def direction_record(direction: Union[torch.Tensor, Mapping[int, torch.Tensor]]) -> Union[list, dict]:
    """A bake's direction as JSON: a list, or ``{"layer": list}`` for per-layer directions."""
    if isinstance(direction, Mapping):
        return {str(layer): v.tolist() for layer, v in sorted(direction.items())}
    return direction.tolist()


@dataclass
class SRAReport:
    model_name: str
    model_type: str
    config: dict
    direction_layer: int
    fluency_rank: int  # rank of the fluency Shield regressed out with the atoms
    strength: dict  # the StrengthProfile that was baked
    bake_layers: Optional[list]
    writers_edited: int
    directions: list  # removed unit directions (or {layer: direction}), first bake then each mining pass
    dirty_direction: list  # SRA's dirty direction at direction_layer (filtered prompts), unit
    search: list  # every scored candidate: layer, rank, profile, refusal_score, kl, ppl_change, feasible, chosen
    validation: dict  # sizes of the validation data and the base model's refusal score
    atom_audit: dict  # {"names": [...], "cosine": [[...]]} incl. "dirty" and "clean"
    explained_share: dict  # layer -> share of the dirty direction the Shield/Confound atoms explained
    target_coverage: dict  # target atom -> {"dirty": |cos|, "clean": |cos|}
    iterations: list  # per mining pass: refused_train, gamma, refusal_score, kl, ppl_change, accepted, judge
    timings: dict  # seconds per pipeline step
    extraction_prompts: dict = field(default_factory=dict)  # harmful/harmless prompts the direction was measured from
    # what extraction read until its statistics converged: per statistic and per set {recorded, kept, available} and
    # the split-half cosine reached, the fluency passages (`build_directions`; empty in reports from before it)
    extraction_reads: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # filled by evaluation (before/after refusal, KL, perplexity)
    invariant: dict = field(default_factory=dict)  # bake self-check: largest residual share along v before/after
    standard_direction: list = field(default_factory=list)  # the unfiltered training prompts' difference of means, unit
    peak_memory: dict = field(default_factory=dict)  # peak RSS (and GPU memory) of the run, MiB: `peak_memory()`
    writers: dict = field(default_factory=dict)  # {layer: writers} as found at the bake (`writer_record`); sra bake replays
    _handles: list = field(default_factory=list, repr=False, compare=False)

    def undo(self) -> None:
        """Restore the model this report came from (all bakes, latest first)."""
        if not self._handles:
            raise UndoError("nothing to undo: this report was loaded from JSON or was already undone; "
                            "reload the base model (or use editing.reapply_edit on it) instead")
        for handle in reversed(self._handles):
            handle.undo()
        self._handles.clear()

    @property
    def handles(self) -> list:
        """The live bakes of this report (empty once undone, or for a report loaded from JSON)."""
        return self._handles

    def attach(self, handles: list) -> None:
        """Make the report live on ``handles`` (what `editing.reapply_edit` baked), or detach it with ``[]``."""
        self._handles = list(handles)

    @property
    def chosen(self) -> dict:
        """The search row that was baked: its validation refusal score, KL and perplexity change."""
        return next(row for row in self.search if row.get("chosen"))

    @property
    def per_layer(self) -> bool:
        """Whether the first bake removed per-layer directions (a ``{layer: vector}`` map)."""
        return bool(self.directions) and isinstance(self.directions[0], dict)

    def direction_tensor(self, index: int = -1) -> Union[torch.Tensor, dict[int, torch.Tensor]]:
        """Bake ``index``'s direction: one vector, or ``{layer: vector}`` for per-layer directions."""
        d = self.directions[index]
        if isinstance(d, dict):
            return {int(layer): torch.tensor(v, dtype=torch.float32) for layer, v in d.items()}
        return torch.tensor(d, dtype=torch.float32)

    def bakes(self) -> list[tuple[torch.Tensor, Any]]:
        """``(direction, strength)`` of each bake, in the pipeline's order: the first with the report's strength
        profile, each accepted mining pass with its flat γ (each is baked orthogonal to the earlier ones)."""
        strengths = [self.strength] + [row["gamma"] for row in self.iterations if row.get("accepted")]
        if len(strengths) != len(self.directions):
            raise SRAError(f"report has {len(self.directions)} directions but {len(strengths)} recorded strengths")
        return [(self.direction_tensor(i), s) for i, s in enumerate(strengths)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SRAReport":
        data = dict(data)
        data["explained_share"] = {int(k): v for k, v in data.get("explained_share", {}).items()}
        return cls(**data)

    def save(self, path: str | os.PathLike) -> str:
        path = os.path.join(path, REPORT_NAME) if os.path.isdir(path) else os.fspath(path)
        write_text_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SRAReport":
        path = os.path.join(path, REPORT_NAME) if os.path.isdir(path) else os.fspath(path)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

"""The one results file every published number comes from: `results_record` turns `Evaluation` objects into
``{"commit", "command", "config_sha256", "sets", "judge", "rows": [...]}`` and `write_results` writes it. The
README's and docs' tables render from these files (``scripts/render_results.py``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from ..folders import write_text_atomic
from ..labels import LABELS
from ..signals.judge import JUDGE_TOKENS, judge_summary
from .evaluation import EvalSets, Evaluation


def git_commit() -> str:
    """The commit of the checkout this package runs from, recorded with every results file; ``SRA_COMMIT`` names
    it for a copy without its .git (a tree copied to another machine), else "unknown" outside git."""
    import subprocess

    if os.environ.get("SRA_COMMIT"):
        return os.environ["SRA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def results_record(evaluations: dict, sets: EvalSets, *, report=None, judge=None, command: str = "",
                   max_new_tokens: int = JUDGE_TOKENS, extra: Optional[dict] = None, commit: Optional[str] = None) -> dict:
    """``{"commit", "command", "config_sha256", "sets", "judge", "rows": [...]}``: one row per evaluated model with
    every metric (rates as ``{"rate", "k", "n", "ci95"}``). `write_results` saves it; README tables render from it.
    ``commit``: the one the run started from (`git_commit()` when it began); default, the checkout's now."""
    rows = []
    for name, evaluation in evaluations.items():
        m = evaluation.metrics if isinstance(evaluation, Evaluation) else evaluation
        row: dict = {"name": name, "label": LABELS.get(name, name)}
        for key, value in m.items():
            if key.endswith("_rate") and f"{key}_ci95" in m:
                row[key] = {"rate": value, "k": m[f"{key}_count"], "n": m[f"{key}_n"], "ci95": m[f"{key}_ci95"]}
            elif isinstance(value, (int, float)) and not key.endswith(("_count", "_refused", "_n")):
                row[key] = value
        rows.append(row)
    config = report.config if report is not None else {}
    return {"commit": commit or git_commit(), "command": command,
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
            "sets": sets.sizes(), "sets_sha256": sets.fingerprint(), "judge": judge_summary(judge),
            "max_new_tokens": max_new_tokens, "rows": rows, **(extra or {})}


def write_results(path: str | os.PathLike, record: dict) -> Path:
    """Write a `results_record` as indented JSON."""
    return write_text_atomic(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")

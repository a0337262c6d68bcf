"""Plain-text tables for the terminal, the run's peak memory line, and the one-line JSON result."""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence


def table(header: Sequence[str], rows: Sequence[Sequence], align: str = "") -> str:
    """A fixed-width table; ``align`` holds one of ``l``/``r`` per column (default: first left, rest right)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def pairs(rows: Sequence[tuple]) -> str:
    """``name  value`` lines with the names padded to one width."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {_cell(value)}" for name, value in rows)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:+.2%}"


def rate(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1%}"


def memory_line(memory: dict) -> str:
    text = f"{memory['ram_mib'] / 1024:.1f} GiB RAM"
    return text + (f", {memory['gpu_mib'] / 1024:.1f} GiB GPU" if "gpu_mib" in memory else "")


def timings_line(timings: dict) -> str:
    total = sum(timings.values())
    return " · ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + f" · total {total:.1f} s"


def emit(result: dict, text: str, as_json: bool) -> None:
    """The command's result on stdout: the human text, or exactly one JSON line."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()

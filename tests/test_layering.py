"""Layers point one way: the low-level modules never reach metrics, the card, the CLI or the package __init__,
directly or through another module (read from the source, so importing the package cannot hide it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "transformers_sra"
LOW_LEVEL = ["method.extraction", "method.editing", "method.search", "method.residualize", "method.directions",
             "models.weights", "models.architectures", "models.probing", "signals.nll", "batching", "_torch_utils",
             "method.mining", "method.inputs", "method.model_directions", "folders", "measure.sandbox"]
HIGH_LEVEL = ("transformers_sra", "transformers_sra.measure.metrics", "transformers_sra.publish.card",
              "transformers_sra.cli", "transformers_sra.measure.evaluation", "transformers_sra.method.pipeline",
              "transformers_sra.demo")


def _module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    path = PACKAGE.joinpath(*parts)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(name: str) -> set[str]:
    """Package modules that ``name`` imports anywhere in its source (function bodies included)."""
    path = _module_file(name)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            if not target.startswith("transformers_sra"):
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if _module_file(f"{target}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("transformers_sra"))
    return {m for m in found if _module_file(m)}


def reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for dep in imports_of(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


@pytest.mark.parametrize("module", LOW_LEVEL)
def test_low_level_modules_never_reach_the_upper_layers(module):
    reached = reachable(f"transformers_sra.{module}")
    assert not {m for m in reached if m in HIGH_LEVEL or m.startswith(HIGH_LEVEL[1:4])}, sorted(reached)


def test_the_check_sees_imports_inside_functions():
    assert "transformers_sra.publish.card" in reachable("transformers_sra.publish.hub")  # hub imports card inside functions
    assert "transformers_sra.measure.metrics" in reachable("transformers_sra.measure.evaluation")

"""Layers point one way. Every module of the package has a place in `LAYERS` (a new module must be placed); a module
imports only from its own layer and the ones below, and the imports (function bodies included) form no cycle. Read
from the source, so importing the package cannot hide an arrow. docs/architecture.md draws the same table."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "transformers_sra"

# bottom to top; a name ending in ".*" places a package and everything in it
LAYERS = {
    "base": ["_version", "_torch_utils", "errors", "cache", "distributed", "folders", "progress", "prompts", "batching",
             "strength", "labels", "config", "report", "testing"],
    "models": ["models", "models.weights", "models.probing", "models.architectures"],
    "signals": ["signals", "signals.decoding", "signals.nll", "signals.logprobs", "signals.judge", "signals.sequence_kl"],
    "method": ["method", "method.atoms", "method.residualize", "method.directions", "method.extraction",
               "method.editing", "method.baselines", "method.search", "method.inputs", "method.convergence",
               "method.build_directions", "method.mining", "method.pipeline", "method.audit"],
    "measure": ["measure", "measure.sandbox", "measure.metrics.*", "measure.tasks", "measure.evaluation",
                "measure.compare", "measure.records", "measure.plan"],
    "publish": ["publish", "publish.figures", "publish.card", "publish.hub", "publish.cast", "publish.adapter", "publish.bake"],
    "interfaces": ["demo", "cli.*", "__main__"],
    "package": ["", "_moved"],  # transformers_sra/__init__.py: the public API, and the old module paths
}


def all_modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(["transformers_sra", *parts]))
    return out


def layer_of(module: str) -> int:
    rel = module[len("transformers_sra."):] if module != "transformers_sra" else ""
    for index, names in enumerate(LAYERS.values()):
        for name in names:
            if rel == name or (name.endswith(".*") and (rel == name[:-2] or rel.startswith(name[:-1]))):
                return index
    raise KeyError(module)


def _module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    path = PACKAGE.joinpath(*parts)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(name: str) -> set[str]:
    """Package modules that ``name`` imports anywhere in its source (function bodies included). ``from pkg import
    mod`` is an arrow to ``pkg.mod``, not to ``pkg``; the parents Python runs on the way are not arrows."""
    path = _module_file(name)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            if not target.startswith("transformers_sra"):
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if _module_file(f"{target}.{alias.name}") else target)
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


def test_every_module_has_a_layer_and_every_entry_a_module():
    unplaced = []
    for module in all_modules():
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these in LAYERS (and in docs/architecture.md): {unplaced}"
    missing = [name for names in LAYERS.values() for name in names
               if not name.endswith(".*") and not _module_file(f"transformers_sra.{name}".rstrip("."))]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


@pytest.mark.parametrize("module", all_modules())
def test_no_module_imports_from_a_higher_layer(module):
    upward = sorted(dep for dep in imports_of(module) if layer_of(dep) > layer_of(module))
    assert not upward, f"{module} (layer {list(LAYERS)[layer_of(module)]}) imports from above: {upward}"


def test_the_imports_form_no_cycle():
    graph = {m: imports_of(m) for m in all_modules()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_check_sees_imports_inside_functions():
    assert "transformers_sra.publish.card" in reachable("transformers_sra.publish.hub")  # hub imports card inside functions
    assert "transformers_sra.measure.evaluation" in imports_of("transformers_sra.cli.evaluate")


_NOT_LOADED = """
import sys
{code}
loaded = sorted(m for m in ("evaluate", "datasets") if m in sys.modules)
assert not loaded, loaded
"""


def _run_clean(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", _NOT_LOADED.format(code=code)], capture_output=True, text=True,
                          timeout=300, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]


def test_importing_the_package_loads_neither_evaluate_nor_datasets():
    _run_clean("import transformers_sra\nfrom transformers_sra import SRAConfig, SRAReport, stream_bake, bake_direction")


def test_sra_bake_loads_neither_evaluate_nor_datasets(tmp_path):
    from conftest import make_report, make_tiny_model
    from test_streaming import SHARD

    model = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    make_report(model).save(tmp_path / "report.json")
    args = ["bake", "--model", str(tmp_path / "base"), "--report", str(tmp_path / "report.json"),
            "--output", str(tmp_path / "out"), "--quiet"]
    _run_clean(f"from transformers_sra.cli import main\nassert main({args!r}) == 0")
    assert (tmp_path / "out" / "config.json").is_file()


def test_every_public_name_and_every_old_module_path_still_imports():
    code = """
import importlib, warnings
import transformers_sra
from transformers_sra._moved import MOVED
for name in transformers_sra.__all__:
    getattr(transformers_sra, name)
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"transformers_sra.{old}")
    assert module is importlib.import_module(f"transformers_sra.{new}"), old
    assert any(w.category is DeprecationWarning and new in str(w.message) for w in caught), old
from transformers_sra.evaluation import EvalSets, evaluate_model  # the README's 0.1 imports
from transformers_sra.editing import bake_direction
from transformers_sra.metrics import RefusalRate
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]

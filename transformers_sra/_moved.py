"""The module paths of 0.1, before the package was split into layers, and those renamed since: ``import
transformers_sra.editing`` still works for a release and warns once. The old name is the same module object as the
new one, so patching either patches both. No file stands at the old paths, so git follows each module to its new
place."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "adapter": "publish.adapter", "architectures": "models.architectures", "atoms": "method.atoms",
    "audit": "method.audit", "baselines": "method.baselines", "card": "publish.card",
    "decoding": "signals.decoding", "directions": "method.directions", "editing": "method.editing",
    "eval_plan": "measure.plan", "evaluation": "measure.evaluation", "extraction": "method.extraction",
    "figures": "publish.figures", "hub": "publish.hub", "inputs": "method.inputs", "judge": "signals.judge",
    "metrics": "measure.metrics", "mining": "method.mining", "model_directions": "method.build_directions",
    "method.model_directions": "method.build_directions",
    "nll": "signals.nll", "pipeline": "method.pipeline", "probing": "models.probing", "profile": "strength",
    "residualize": "method.residualize", "sandbox": "measure.sandbox", "search": "method.search",
    "sequence_kl": "signals.sequence_kl", "streaming": "publish.bake", "tasks": "measure.tasks",
    "weights": "models.weights",
}
_PACKAGE = __name__.rsplit(".", 1)[0]


def new_name(old: str) -> str | None:
    """``transformers_sra.editing`` -> ``transformers_sra.method.editing`` (submodules of a moved package too)."""
    if not old.startswith(_PACKAGE + "."):
        return None
    rel = old[len(_PACKAGE) + 1:]
    for key in sorted(MOVED, key=len, reverse=True):  # the longest old path that heads the name
        if rel == key or rel.startswith(key + "."):
            return f"{_PACKAGE}.{MOVED[key]}{rel[len(key):]}"
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=4)
        return importlib.import_module(self.new)

    def exec_module(self, module):
        pass  # the module object is the new one, already run


class MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None or importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())  # before the path finders: a leftover folder must not shadow it

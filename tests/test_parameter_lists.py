"""Public parameter lists stay short: at most 8 named parameters (self and cls left out, keyword-only counted) for
every public function and method of the package. Past that, pass the config whole (peft-style) or a small frozen
dataclass that groups what belongs together (`search.SearchSpace`, `config.Budgets`, `evaluation.EvalOptions`).
``**overrides`` is not counted: it stands for the fields of such an options dataclass, which are documented there.
Read from the source, as the layering test reads imports."""

from __future__ import annotations

import ast

from test_layering import _module_file, all_modules

MAX_PARAMETERS = 8


def named_parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def public_functions(tree: ast.Module) -> dict[str, list[str]]:
    """``{qualified name: parameters}`` of the module's public functions and its public classes' public methods
    (``__init__`` included); nested functions are a body's own business."""
    found = {}

    def walk(body: list, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not node.name.startswith("_") or node.name == "__init__":
                    found[prefix + node.name] = named_parameters(node)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                walk(node.body, f"{prefix}{node.name}.")

    walk(tree.body, "")
    return found


def _is_public_module(name: str) -> bool:
    return not any(part.startswith("_") and part not in ("__init__", "__main__") for part in name.split("."))


def test_no_public_function_takes_more_than_8_parameters():
    long = []
    for module in filter(_is_public_module, all_modules()):
        path = _module_file(module)
        for name, params in public_functions(ast.parse(path.read_text(encoding="utf-8"))).items():
            if len(params) > MAX_PARAMETERS:
                long.append(f"{module}.{name} ({len(params)}: {', '.join(params)})")
    assert not long, "group these parameters (the config whole, or a frozen dataclass):\n" + "\n".join(long)


def test_the_count_sees_methods_keyword_only_parameters_and_skips_private_names():
    source = """
def wide(model, tokenizer, a, b, *, c, d, e, f, g, **overrides): ...
def _private(a, b, c, d, e, f, g, h, i): ...
class Public:
    def method(self, a, b, c, d, e, f, g, h, i): ...
    @classmethod
    def build(cls, a): ...
class _Hidden:
    def method(self, a, b, c, d, e, f, g, h, i): ...
"""
    counts = {name: len(params) for name, params in public_functions(ast.parse(source)).items()}
    assert counts == {"wide": 9, "Public.method": 9, "Public.build": 1}

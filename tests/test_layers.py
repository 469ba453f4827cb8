"""Imports point one way: nkv.cli -> nkv.editing -> nkv.loaders -> nkv (the format).

Read from the source (no imports run), module-level and function-level imports alike, so
a cycle cannot hide inside a function. The one allowed exception is `nkv.load_nkv_adapter`,
which `nkv_format/__init__.py` imports lazily from the loaders on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> (import name, rank); a module may import only from its own rank or lower ones
LAYERS = {"nkv_format": ("nkv", 0), "loaders": ("nkv.loaders", 1), "editing": ("nkv.editing", 2),
          "cli": ("nkv.cli", 3)}
ALLOWED = {("nkv", "nkv.loaders")}  # nkv/__init__.py: the lazy load_nkv_adapter


def _rank(module: str) -> int:
    best = 0
    for name, rank in LAYERS.values():
        if module == name or module.startswith(name + "."):
            best = max(best, rank)
    return best


def _module_name(folder: str, path: Path) -> str:
    parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
    return ".".join([LAYERS[folder][0], *parts])


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "nkv" or a.name.startswith("nkv.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and (node.module == "nkv" or node.module.startswith("nkv.")):
                found.add(node.module)
    return found


def test_imports_point_one_way():
    wrong = []
    for folder, (_, rank) in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = _module_name(folder, path)
            for target in _imports(module, path):
                if _rank(target) > rank and (module, target) not in ALLOWED:
                    wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert wrong == [], "imports against the layering:\n" + "\n".join(wrong)


def test_the_check_sees_relative_and_absolute_imports():
    module = "nkv.editing.evaluate.run"
    found = _imports(module, ROOT / "editing" / "evaluate" / "run.py")
    assert "nkv.loaders.transformers" in found and "nkv.editing.evaluate.measure" in found
    assert _rank("nkv.editing.solve.api") == 2 and _rank("nkv.loaders") == 1 and _rank("nkv.facts") == 0

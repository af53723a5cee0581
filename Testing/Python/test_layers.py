"""The library's layers: each package imports only from the layers below it or its own, and no module imports itself
back through others. Read from the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[2] / "KneeBoneSegLib"

# Lowest first. A package (or top-level module) may import from its own layer's modules and from lower layers.
LAYERS = [
    ("__init__", "errors", "anatomy", "volume", "threads", "options", "atomic"),  # plain values and tools
    ("preprocess",),  # intensities and grids
    ("network",),  # models, engines, tiled inference
    ("trust",),  # checks of the input and of the result
    ("postprocess", "metrics"),  # components, closing, surfaces; scores
    ("io",),  # every file format, reading and writing the objects above
    ("pipeline",),  # segment and postprocess, the one path through the stages
    ("batch", "training"),  # a cohort; training a network
    ("cli", "slicer", "__main__"),  # front ends
]
LAYER_OF = {unit: index for index, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(path: Path) -> set[str]:
    """The library modules ``path`` imports, absolute."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "KneeBoneSegLib":
                # "from . import x" names a module when x is one.
                found.update(
                    f"{base}.{alias.name}"
                    if (LIBRARY.parent / f"{base}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()
                    else base
                    for alias in node.names
                )
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "KneeBoneSegLib")
    return found - {name}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {_module_name(path): _imports(path) for path in LIBRARY.rglob("*.py")}


def test_every_package_has_a_layer():
    assert {_unit(module) for module in GRAPH} == set(LAYER_OF)


def test_no_import_runs_up_a_layer():
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if LAYER_OF[_unit(target)] > LAYER_OF[_unit(module)]
    )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_module_imports_itself_back():
    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(GRAPH.get(start, ()))
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(GRAPH.get(module, ()))
        return seen

    circles = sorted(module for module in GRAPH if module in reaches(module))
    assert not circles, f"modules in an import circle: {circles}"

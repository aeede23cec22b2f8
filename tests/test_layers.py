"""Imports point down or sideways, never up, and never in a circle.

The order of the layers is the table under "## Layers" in docs/architecture.md; the check reads it from
there, so the doc and the test cannot disagree. Imports are read from the source with ``ast`` (nothing is
imported), wherever they stand: at the top, inside functions, under ``TYPE_CHECKING``. An import of
``a.b.c`` counts as one of that module, not of the packages above it, whose ``__init__`` Python also runs.
"""

from __future__ import annotations

import ast
import graphlib
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "overtone"
DOC = REPO / "docs" / "architecture.md"
ROOT = "__init__"  # the room of the package root itself


def read_layers(markdown: str) -> dict[str, int]:
    """Room -> layer, from the table under the ``## Layers`` heading (first column the layer, second the rooms)."""
    section = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", markdown, re.DOTALL | re.MULTILINE)
    if section is None:
        raise ValueError("no '## Layers' section")
    layers: dict[str, int] = {}
    for row in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", section.group(1), re.MULTILINE):
        for room in re.findall(r"`([^`]+)`", row[1]):
            if room in layers:
                raise ValueError(f"room {room!r} stands in layers {layers[room]} and {row[0]}")
            layers[room] = int(row[0])
    if not layers:
        raise ValueError("the '## Layers' section has no table rows")
    return layers


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package`` (a package is its ``__init__``)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = (package.name, *path.relative_to(package).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def room(module: str) -> str:
    """The top-level module or package of ``module`` (``overtone.editors.base`` -> ``editors``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """Module -> {module of the package it imports: line of the first such import}."""
    known = modules(package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:  # ``import pkg.mod.attr`` style names: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def upward_imports(package: Path, layers: Mapping[str, int]) -> list[str]:
    """Every import of a room from a higher layer, and every room that has no layer."""
    graph = import_graph(package)
    unplaced = sorted({room(m) for m in graph} - set(layers))
    problems = [f"room {r!r} has no layer in the table" for r in unplaced]
    for module, targets in sorted(graph.items()):
        for target, line in sorted(targets.items()):
            low, high = room(module), room(target)
            if low in layers and high in layers and layers[high] > layers[low]:
                problems.append(f"{module} (line {line}, layer {layers[low]}) imports {target} "
                                f"(layer {layers[high]} `{high}`)")
    return problems


def circles(package: Path) -> list[str]:
    """An import circle between modules, and one between rooms, if there is any."""
    graph = import_graph(package)
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        rooms.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    found = []
    for kind, edges in (("modules", graph), ("rooms", rooms)):
        try:
            graphlib.TopologicalSorter({k: set(v) for k, v in edges.items()}).prepare()
        except graphlib.CycleError as exc:
            found.append(f"{kind} import each other in a circle: {' -> '.join(reversed(exc.args[1]))}")
    return found


# ------------------------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    return read_layers(DOC.read_text(encoding="utf-8"))


def test_the_table_places_exactly_the_rooms_of_the_package(layers):
    rooms = {room(m) for m in modules(PACKAGE)}
    assert set(layers) == rooms, f"without a layer: {sorted(rooms - set(layers))}; " \
                                 f"in the table but not in the package: {sorted(set(layers) - rooms)}"
    assert sorted(set(layers.values())) == list(range(1, max(layers.values()) + 1))


def test_no_import_points_up(layers):
    assert any(import_graph(PACKAGE).values()), "no imports found: the reader of the source is broken"
    assert upward_imports(PACKAGE, layers) == []


def test_no_import_circle():
    assert circles(PACKAGE) == []


def test_nothing_imports_the_package_root():
    graph = import_graph(PACKAGE)
    assert sorted(m for m, targets in graph.items() if PACKAGE.name in targets) == []


def test_evaluation_is_independent_of_the_statistics():
    """Scoring an edit needs no part of ROME/MEMIT's statistics; the helpers both use sit below both."""
    graph = import_graph(PACKAGE)
    assert sorted((m, t) for m, targets in graph.items() if room(m) == "evaluation"
                  for t in targets if room(t) == "stats") == []


# ------------------------------------------------------------------------------------- the check itself


def plant(tmp_path: Path, files: Mapping[str, str]) -> Path:
    """A package ``pkg`` of the given files (paths relative to it), every folder with an ``__init__.py``."""
    package = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in path.relative_to(package).parents:
            (package / folder / "__init__.py").touch()
        path.write_text(text)
    return package


PLANTED_LAYERS = {"low": 1, "mid": 2, "high": 3, ROOT: 4}
CLEAN = {
    "low/a.py": "X = 1\n",
    "low/b.py": "from pkg.low.a import X\n",
    "mid.py": "from .low import b\nimport pkg.low.a\n",
    "high/c.py": "from ..mid import b\nfrom pkg import low\n",
}


def test_the_check_passes_a_clean_tree(tmp_path):
    package = plant(tmp_path, CLEAN)
    assert import_graph(package)["pkg.mid"] == {"pkg.low.b": 1, "pkg.low.a": 2}
    assert upward_imports(package, PLANTED_LAYERS) == []
    assert circles(package) == []


@pytest.mark.parametrize("planted", [
    "from pkg.high.c import Y\n",  # absolute, at the top
    "from ..high import c\n",  # relative, a submodule
    "def f():\n    import pkg.high.c\n",  # inside a function
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.mid import Z\n",
    "from pkg import Z\n",  # the package root
])
def test_the_check_catches_a_planted_upward_import(tmp_path, planted):
    package = plant(tmp_path, {**CLEAN, "low/a.py": planted})
    problems = upward_imports(package, PLANTED_LAYERS)
    assert len(problems) == 1 and problems[0].startswith("pkg.low.a ("), problems


def test_the_check_catches_a_room_without_a_layer(tmp_path):
    package = plant(tmp_path, {**CLEAN, "new.py": "from pkg.low.a import X\n"})
    assert upward_imports(package, PLANTED_LAYERS) == ["room 'new' has no layer in the table"]


def test_the_check_catches_a_planted_circle(tmp_path):
    # sideways imports within one room are allowed, but not round: a -> b -> a, one of them for typing only
    planted = {**CLEAN,
               "low/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.low.b import Y\n"}
    package = plant(tmp_path, planted)
    assert upward_imports(package, PLANTED_LAYERS) == []
    found = circles(package)
    assert len(found) == 1 and found[0].startswith("modules import each other in a circle"), found
    assert set(re.findall(r"pkg\.low\.[ab]", found[0])) == {"pkg.low.a", "pkg.low.b"}


def test_the_check_catches_a_circle_between_rooms_of_one_layer(tmp_path):
    package = plant(tmp_path, {**CLEAN, "low/a.py": "X = 1\n", "side/d.py": "from pkg.low.b import X\n",
                               "low/e.py": "from pkg.side.d import X\n"})
    assert upward_imports(package, {**PLANTED_LAYERS, "side": 1}) == []
    found = circles(package)
    assert len(found) == 1 and re.fullmatch(r"rooms import each other in a circle: (low|side) -> \w+ -> \1", found[0])
    assert "side" in found[0] and "low" in found[0]


def test_the_table_is_read_from_markdown():
    doc = ("# A\n\n## Layers\n\ntext `not_a_room`\n\n| layer | rooms |\n|---|---|\n| 1 | `low`, `mid` |\n"
           "| 2 | `high` (`tail`) |\n\n## Next\n\n| 3 | `elsewhere` |\n")
    assert read_layers(doc) == {"low": 1, "mid": 1, "high": 2, "tail": 2}
    with pytest.raises(ValueError, match="layers 1 and 2"):
        read_layers(doc.replace("`high`", "`low`"))
    with pytest.raises(ValueError, match="no '## Layers'"):
        read_layers("# A\n")

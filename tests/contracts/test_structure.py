"""The package's structure: components subclass their kind's interface, imports go one way (no cycles
between modules or between packages), the registry depends on nothing of arlab, the generator and the
trainer do not probe components with hasattr/getattr, and files stay short enough to hold in one's head."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from arlab import registry

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "arlab"
MAX_LINES = 400
LONG_FILE_REASON = "Longer than 400 lines because"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def arlab_imports(path: Path) -> set[str]:
    """Every arlab module ``path`` imports (at any depth: top level and inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("arlab"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("arlab") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m in MODULES} - {module_name(path)}


GRAPH = {m: arlab_imports(p) for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "arlab"


def test_no_import_cycle_between_modules():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_no_import_cycle_between_packages():
    """``arlab.data`` and ``arlab.tokenizer`` (and every other pair) do not import each other."""
    pkgs: dict[str, set[str]] = {}
    for m, deps in GRAPH.items():
        if package_of(m) in ("cli", "arlab", "__main__"):  # the command line imports everything, nothing imports it
            continue
        pkgs.setdefault(package_of(m), set()).update(package_of(d) for d in deps if package_of(d) != package_of(m))
    assert find_cycle(pkgs) is None, " -> ".join(find_cycle(pkgs) or [])


def test_the_registry_depends_on_nothing_of_arlab_but_errors():
    assert GRAPH["arlab.registry"] <= {"arlab.errors"}
    assert GRAPH["arlab.errors"] == set()


@pytest.mark.parametrize("path", [PKG / "train.py", *sorted((PKG / "generator").glob("*.py")),
                                  *sorted((PKG / "task").glob("*.py"))], ids=lambda p: p.relative_to(PKG).as_posix())
def test_generator_and_trainer_do_not_probe_components(path):
    """Components are used through their declared interfaces, never discovered by attribute probing."""
    src = path.read_text()
    probes = [m.group(0) for m in re.finditer(r"\b(hasattr|getattr)\([^)]*\)", src)]
    assert probes == [], probes


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: p.relative_to(PKG).as_posix())
def test_files_stay_short_or_say_why(path):
    n = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert n <= MAX_LINES or LONG_FILE_REASON in doc, f"{path.name}: {n} lines and no reason in its docstring"


@pytest.mark.parametrize("kind", registry.kinds())
def test_every_component_subclasses_its_interface(kind):
    base = registry.interface(kind)
    for entry in registry.entries(kind):
        if base is not None:
            assert issubclass(entry.cls, base), entry.key
        assert entry.cls.registry_key == entry.key


def test_no_dead_kinds():
    """Every component package holds at least one component; no kind is declared and left empty."""
    for kind in registry.kinds():
        assert registry.names(kind), f"kind {kind} has no component"

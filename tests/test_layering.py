"""The package's floors: every import statement of ``src/batchnorm`` (module-level *and* inside
functions) points down or sideways within its own floor, never up, and the imports form no loop.

Read from the source with :mod:`ast` rather than from ``sys.modules``, so an import that only
runs inside a function (a lazy import) counts as much as one at the top of a file.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "batchnorm"

# Floor of each part of the package, bottom up. A module may import from a lower floor or from its
# own part; two parts on one floor must not import each other (reporting reads a run's files and
# never the experiments that wrote them).
FLOORS = {
    "batchnorm._atomic": 0,
    "batchnorm._cache": 0,
    "batchnorm.functional": 1,
    "batchnorm.data": 1,
    "batchnorm.nn": 2,
    "batchnorm.tools": 3,
    "batchnorm": 4,  # the package's __init__: the public names of the library
    "batchnorm.runfiles": 4,  # the run-file schema: experiments write it, reporting reads it
    "batchnorm.experiments": 5,
    "batchnorm.reporting": 5,
    "batchnorm.cli": 6,
    "batchnorm.__main__": 7,
}
LIBRARY = ("batchnorm.functional", "batchnorm.data", "batchnorm.nn", "batchnorm.tools")
HEAVY = ("matplotlib", "tensorboard", "tqdm")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> set[str]:
    """Every module ``module`` imports, from any scope (``from X import y`` counts as X.y when
    that is a module of the package)."""
    path = MODULES[module]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return out


def floor_of(module: str) -> tuple[str, int]:
    part = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return part, FLOORS[part]


def test_every_module_has_a_floor():
    for module in MODULES:
        floor_of(module)  # raises ValueError (max of nothing) for a module outside every part


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_or_within_the_same_part(module):
    part, floor = floor_of(module)
    for target in imports(module):
        if not target.startswith("batchnorm"):
            if part in LIBRARY:
                assert target.split(".")[0] not in HEAVY, f"{module} imports {target}"
            continue
        tpart, tfloor = floor_of(target)
        assert tpart == part or tfloor < floor, (
            f"{module} (floor {floor}, {part}) imports {target} (floor {tfloor}, {tpart})"
        )


def test_imports_form_no_loop():
    graph = {m: {t for t in imports(m) if t in MODULES} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                loop = [*path[path.index(t) :], t] if t in path else [m, t]
                pytest.fail("import loop: " + " -> ".join(loop))
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_a_function_level_loop(tmp_path, monkeypatch):
    """The two tests above would pass vacuously if the AST walk missed imports inside functions."""
    nested = ast.parse("def f():\n    from ..tools.sync import convert_sync\n")
    node = next(n for n in ast.walk(nested) if isinstance(n, ast.ImportFrom))
    assert _resolve("batchnorm.nn.sync", False, node) == "batchnorm.tools.sync"
    assert any(
        isinstance(n, ast.ImportFrom)
        for n in ast.walk(ast.parse(MODULES["batchnorm.cli"].read_text()))
    )
    assert "batchnorm.experiments" in {
        t[: len("batchnorm.experiments")] for t in imports("batchnorm.cli")
    }  # the CLI's experiment imports are all inside functions


def test_library_does_not_load_experiments_or_plotting_at_import():
    # (not tqdm here: torch itself imports it, through torch.hub)
    code = (
        "import sys, batchnorm, batchnorm.functional, batchnorm.nn, batchnorm.tools, batchnorm.data\n"
        "bad = [m for m in sys.modules if m.startswith(('batchnorm.experiments', "
        "'batchnorm.reporting', 'batchnorm.cli'))]\n"
        "heavy = [m for m in ('matplotlib', 'tensorboard') if m in sys.modules]\n"
        "print(bad, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"

"""The package's import graph: every module imports, the graph among adsa_jax modules has no
cycle (imports inside functions count: a lazy import is still a dependency), and no library
module imports the command line (adsa_jax.cli sits above the library)."""
import ast
import importlib
from pathlib import Path

import pytest

import adsa_jax

ROOT = Path(adsa_jax.__file__).resolve().parent
PKG = "adsa_jax"


def module_names():
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((PKG,) + parts)] = path
    return out


MODULES = module_names()


def _is_package(name):
    return MODULES[name].name == "__init__.py"


def imports_of(name):
    """The adsa_jax modules that module `name` imports (at any depth of its code)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    here = name if _is_package(name) else name.rpartition(".")[0]  # the package relative imports start from
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                found.add(sub if sub in MODULES else target)
    # Keep adsa_jax modules; a.b.c not a module of its own (an attribute path) counts as its module.
    out = set()
    for m in found:
        while m and m not in MODULES:
            m = m.rpartition(".")[0]
        if m and m != name and m != PKG:
            out.add(m)
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_import_graph_has_no_cycle():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_library_never_imports_the_command_line():
    cli = {m for m in MODULES if m == f"{PKG}.cli" or m.startswith(f"{PKG}.cli.")}
    assert cli, "adsa_jax.cli not found"
    bad = {m: sorted(GRAPH[m] & cli) for m in MODULES if m not in cli and GRAPH[m] & cli}
    assert not bad, f"library modules importing adsa_jax.cli: {bad}"


def test_sharding_builds_meshes_only():
    """sharding (meshes, specs, shardings) sits below generation: it never imports generate."""
    assert f"{PKG}.generate" not in GRAPH[f"{PKG}.sharding"]
    assert f"{PKG}.sharding" in GRAPH[f"{PKG}.generate"]

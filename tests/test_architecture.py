"""The shape of the code (docs/architecture.md), checked: layers import only downwards, no import
cycles (lazy imports inside functions count), small modules and functions, short signatures unless
a reason is written next to them, and the registries agree with the names the config accepts."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "loraprune"
# package -> the packages it may import (besides itself and the base modules)
BASE = {"errors", "files", "sysmem", "faults", "__init__"}
ALLOWED = {
    "__main__": {"cli"},
    "core": set(),
    "data": set(),
    "models": {"core", "export"},      # builds exports with loraprune's own modeling classes
    "export": {"core", "models"},
    "eval": {"core", "data", "models"},
    "run": {"core", "data", "models", "export", "eval"},
    "bench": {"core", "data", "models", "export", "eval", "run"},
    "cli": {"core", "data", "models", "export", "eval", "run", "bench"},
}
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMS = 300, 60, 7


def modules():
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC).with_suffix("")
        name = ".".join(("loraprune", *rel.parts)).removesuffix(".__init__")
        yield name, f


def imports_of(name: str, path: Path) -> set[str]:
    """Every loraprune module `path` imports, anywhere in the file."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "loraprune"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "loraprune":
                continue
            known = {n for n, _ in modules()}
            for a in node.names:  # `from . import x` imports the module x
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return out


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_layers_import_only_downwards():
    bad = []
    for name, path in modules():
        layer = top(name)
        for dep in imports_of(name, path):
            d = top(dep)
            if d in BASE or d == layer or layer in BASE:
                continue
            if d not in ALLOWED.get(layer, set()):
                bad.append(f"{name} imports {dep}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: {d for d in imports_of(name, path) if d != name} for name, path in modules()}
    graph = {n: {d for d in ds if d in graph and not n.startswith(d + ".") and d != "loraprune"}
             for n, ds in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for d in sorted(graph[n]):
            visit(d)
        stack.pop()

    for n in sorted(graph):
        visit(n)
    assert not cycles, " / ".join(" -> ".join(c) for c in cycles)


def _functions():
    for name, path in modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node, lines


def test_modules_and_functions_are_small():
    big = [f"{n}: {len(p.read_text().splitlines())} lines" for n, p in modules()
           if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    long = [f"{n}.{f.name}: {f.end_lineno - f.lineno + 1} lines" for n, f, _ in _functions()
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not big and not long, "\n".join(big + long)


def test_long_signatures_say_why():
    bad = []
    for n, f, lines in _functions():
        a = f.args
        count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
        if a.args and a.args[0].arg in ("self", "cls"):
            count -= 1
        if count <= MAX_PARAMS:
            continue
        head = lines[f.lineno - 1:f.body[0].lineno + 1]
        if not any("# params:" in line for line in head):
            bad.append(f"{n}.{f.name}: {count} parameters and no '# params:' reason")
    assert not bad, "\n".join(bad)


def test_registries_agree_with_the_config():
    from loraprune.core.arch import FAMILIES
    from loraprune.core.config import CRITERIA, ELEMENT_CRITERIA, UNIT_FORM
    from loraprune.core.criteria import UNIT_CRITERIA
    from loraprune.core.criteria.element import ELEMENT_SCORERS, build_scorer
    from loraprune.export.modeling_loraprune import _MODELS

    assert tuple(UNIT_CRITERIA) == CRITERIA
    assert tuple(ELEMENT_SCORERS) == ELEMENT_CRITERIA
    assert set(FAMILIES) == set(_MODELS)
    for name in ELEMENT_CRITERIA:  # each element criterion names its structured form, which exists
        unit = build_scorer(name).unit_criterion
        assert unit in UNIT_CRITERIA and UNIT_FORM.get(name, name) == unit


@pytest.mark.parametrize("pkg", ["core", "run", "export", "eval", "bench", "cli"])
def test_every_package_says_what_it_holds(pkg):
    doc = ast.get_docstring(ast.parse((SRC / pkg / "__init__.py").read_text()))
    assert doc and len(doc) > 40

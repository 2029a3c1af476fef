"""The package's shape: layers that import only downward, no import circle (imports inside functions
count), and the size limits that keep each module readable."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moecli"

# Lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS = [
    ("moecli.errors", "moecli.fsutil", "moecli.paths", "moecli.version"),
    ("moecli.data",),
    ("moecli.model",),
    ("moecli.routing",),
    ("moecli.adapter",),
    ("moecli.methods",),
    ("moecli.engine",),
    ("moecli.world",),
    ("moecli.cli", "moecli"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every moecli module `path` imports, at any depth of its code (`from a import b` is `a.b` when `a.b` is a
    module, else `a`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def _layer(name: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best[0]


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    upward = [f"{a} -> {b}" for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a)]
    assert upward == []


def test_no_import_circle_even_through_imports_inside_functions():
    graph = _graph()
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                circles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_no_module_over_500_lines_and_no_cli_function_over_60():
    long_modules = [f"{n}: {len(p.read_text().splitlines())}" for n, p in _modules().items()
                    if len(p.read_text().splitlines()) > 500]
    assert long_modules == []
    long_functions = []
    for path in (PACKAGE / "cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.name}:{node.name}: {node.end_lineno - node.lineno + 1}")
    assert long_functions == []


def test_the_layers_name_every_package():
    for name in _modules():
        _layer(name)

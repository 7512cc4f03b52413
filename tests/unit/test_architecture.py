"""The package's layering, checked on the sources: no import cycle, pure math stays pure, modules stay small."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "upgrpo_megatron"
MAX_LINES = 430  # ~400: "one job per module"; a module over it must say why here
LONG_MODULES_WITH_A_REASON: set = set()  # none today


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """Every project module a file imports, at module level or inside functions (both make a dependency)."""
    tree = ast.parse(path.read_text())
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                yield f"{base}.{a.name}"
                yield base


def _graph():
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path):
            # the longest project module the import names (`from a.b import c`: a.b.c if it is a module, else a.b)
            while imp and imp not in modules:
                imp = imp.rsplit(".", 1)[0] if "." in imp else ""
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def _is_reexport(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodules to re-export them is not a dependency cycle."""
    return b.startswith(a + ".")


def test_no_import_cycles_in_the_package():
    graph = _graph()
    edges = {a: {b for b in deps if not _is_reexport(a, b)} for a, deps in graph.items()}
    cycles, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_losses_and_diagnostics_never_import_megatron_or_vllm():
    bad = []
    for sub in ("losses", "diagnostics"):
        for path in (PKG / sub).rglob("*.py"):
            for imp in set(_imports(path)):
                if imp.split(".")[0] in ("megatron", "vllm") or imp.startswith(("upgrpo_megatron.megatron",
                                                                                 "upgrpo_megatron.rollout.engine")):
                    bad.append(f"{path.relative_to(PKG)} imports {imp}")
    assert bad == []


def test_no_module_is_longer_than_about_400_lines_without_a_stated_reason():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_MODULES_WITH_A_REASON), long


# the project's working notes live beside the repository, not in it; assembled from parts so that this file is
# not itself a citation of them
_OUTSIDE_NOTES = tuple("".join(parts) for parts in (("DESIGN", ".md"), ("seed/", "up-grpo"), ("..", "/shared")))


def test_the_package_cites_no_file_outside_the_repository():
    cites = [str(p.relative_to(PKG.parent)) for p in [*PKG.rglob("*.py"), *PKG.parent.joinpath("tools").glob("*.py")]
             if any(s in p.read_text() for s in _OUTSIDE_NOTES)]
    assert cites == []

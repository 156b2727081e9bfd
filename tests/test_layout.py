"""The package's folders show its architecture, and imports flow one way between them.

`offload/` (the cache machinery and its kernels) knows nothing of vLLM's hooks, the planner or
the synthetic checkpoints; `integration/` (what vLLM calls) uses `offload/` and not the
planner; the modules at the top that others import import nothing of the package; nothing but
a tool imports a tool (the command-line entry points). Every import counts, also those inside
functions (an import moved into a function to dodge a cycle still is one) and relative ones,
and the modules' graph, packages' `__init__` included, has no cycle.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_moe_offload"

# where a module lives (its folder, or its own name at the top) -> what it may import: names
# of folders or modules, each also allowing what lies below it; its own folder always
ALLOWED = {
    "offload": {"config", "units"},
    "synthetic": {"offload.geometry", "units"},  # the model's shape
    "integration": {"offload", "synthetic", "config", "envs", "units"},
    "planning": {"offload", "synthetic", "config", "units"},
    "config": set(), "envs": set(), "units": set(), "server": set(),
}
TOOLS = {"__main__", "cli", "demo", "plugin", "planning.plan_cli", "integration.vllm_cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(module: str) -> bool:
    return PACKAGE.joinpath(*module.split("."), "__init__.py").exists()


def exists(module: str) -> bool:
    return is_package(module) or PACKAGE.joinpath(*module.split(".")).with_suffix(".py").exists()


def package_imports(path: Path) -> set[str]:
    """The package's modules `path` imports, as names relative to the package ("" for the
    package's own __init__)."""
    module = module_name(path)
    here = module.split(".") if is_package(module) else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: against this module's package
                parts = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                base = ".".join(parts + ([node.module] if node.module else []))
            elif node.module == "vllm_moe_offload":
                base = ""
            elif node.module and node.module.startswith("vllm_moe_offload."):
                base = node.module.removeprefix("vllm_moe_offload.")
            else:
                continue
            for alias in node.names:  # `from pkg import x` names module x when there is one
                sub = f"{base}.{alias.name}".lstrip(".")
                names.add(sub if exists(sub) else base)
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("vllm_moe_offload.") for a in node.names
                      if a.name.startswith("vllm_moe_offload.")}
    return names - {""}


def graph() -> dict[str, set[str]]:
    return {module_name(p): package_imports(p) for p in PACKAGE.rglob("*.py")}


def within(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def test_folders_import_one_way():
    wrong = []
    for module, imports in graph().items():
        home = module.split(".")[0]
        for name in imports:
            if name in TOOLS and module not in TOOLS:
                wrong.append(f"{module} -> {name} (a tool)")
            elif home in ALLOWED and not within(name, home) and not any(
                    within(name, scope) for scope in ALLOWED[home]):
                wrong.append(f"{module} -> {name}")
    assert not wrong, "imports against the layout:\n" + "\n".join(sorted(wrong))


def cycle_graph() -> dict[str, set[str]]:
    """graph() plus an edge to every package an import runs (`import a.b.c` runs a and a.b),
    but for the importer's own packages, which are already running."""
    edges = {}
    for module, imports in graph().items():
        parts = module.split(".")
        own = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        out = set()
        for name in imports:
            pieces = name.split(".")
            out |= {".".join(pieces[:i]) for i in range(1, len(pieces) + 1)}
        edges[module] = out - own
    return edges


def test_no_import_cycle():
    g = cycle_graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):]
                                                                     + [nxt]))
            if nxt in g and state.get(nxt) is None:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if state.get(node) is None:
            visit(node, [node])


def test_the_checker_sees_what_it_checks():
    """The rules above run on a graph that has this layout's modules and edges."""
    g = graph()
    assert {"offload.cache", "integration.model", "planning.planner",
            "synthetic.traces", "units", "offload.kernels"} <= set(g)
    assert "offload.cache" in g["integration.model"]
    assert "offload.kernels.directory" in g["offload.cache"]
    assert "offload.kernels" in cycle_graph()["offload.cache"]  # the package's __init__ runs

"""The package's folders show its architecture, and imports flow one way between them.

`offload/` (the cache machinery and its kernels) knows nothing of vLLM's hooks, the planner or
the synthetic checkpoints; `integration/` (what vLLM calls) uses `offload/` and not the
planner; nothing in the package imports the command-line tools. Every import counts, also those
inside functions (an import moved into a function to dodge a cycle still is one), and the
modules' graph has no cycle.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_moe_offload"

# folder -> the folders and top-level modules it may import (its own folder always)
ALLOWED = {
    "offload": {"config", "units"},
    "synthetic": {"offload", "units"},  # the model's shape: offload/geometry.py
    "integration": {"offload", "synthetic", "config", "envs", "units"},
    "planning": {"offload", "synthetic", "config", "units"},
}
TOOLS = {"cli", "demo", "plugin", "__main__"}  # entry points: nothing in the package imports them


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> set[str]:
    """The package's modules `path` imports, as names relative to the package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vllm_moe_offload":
                names |= {alias.name for alias in node.names}
            elif node.module.startswith("vllm_moe_offload."):
                base = node.module.removeprefix("vllm_moe_offload.")
                # `from pkg.folder import module` names a module when one exists by that name
                for alias in node.names:
                    sub = PACKAGE.joinpath(*base.split("."), alias.name)
                    names.add(f"{base}.{alias.name}" if sub.with_suffix(".py").exists()
                              or sub.is_dir() else base)
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("vllm_moe_offload.") for a in node.names
                      if a.name.startswith("vllm_moe_offload.")}
    return names


def graph() -> dict[str, set[str]]:
    return {module_name(p): package_imports(p) for p in PACKAGE.rglob("*.py")}


def test_folders_import_one_way():
    wrong = []
    for module, imports in graph().items():
        folder = module.split(".")[0]
        for name in imports:
            target = name.split(".")[0]
            if target in TOOLS and module.split(".")[0] not in TOOLS:
                wrong.append(f"{module} -> {name} (a tool)")
            elif folder in ALLOWED and target != folder and target not in ALLOWED[folder]:
                wrong.append(f"{module} -> {name}")
    assert not wrong, "imports against the layout:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    g = graph()
    # a package's __init__ stands for the package: `from pkg import x` also runs it
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt in g and state.get(nxt) is None:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if state.get(node) is None:
            visit(node, [node])


def test_the_checker_sees_what_it_checks():
    """The rules above run on a graph that has the modules and edges this layout has."""
    g = graph()
    assert {"offload.cache", "integration.model", "planning.planner",
            "synthetic.traces", "units"} <= set(g)
    assert "offload.cache" in g["integration.model"]
    assert "offload.kernels.directory" in g["offload.cache"]

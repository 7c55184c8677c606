"""The import graph of the project's own packages, read from the source (every import statement,
function-level ones included): only the arrows below exist, and no module takes part in a cycle.

    consumer -> alerts, model, config        trainer -> alerts, model, config
    config   -> model.spec, alerts.limits (plain descriptions only: no torch in a config)
    alerts, model -> nothing of ours         bench -> public names of the packages, never tests
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("alerts", "config", "consumer", "model", "trainer")
ALLOWED = {
    "alerts": set(),
    "model": set(),
    "config": {"model", "alerts"},
    "consumer": {"alerts", "model", "config"},
    "trainer": {"alerts", "model", "config"},
    "bench": {"alerts", "model", "config", "consumer"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import statement of a file."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _ours(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in (*PACKAGES, "tests") else None


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in (*PACKAGES, "bench") for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for mod, names in _imports(path):
            if _ours(mod) is None:
                continue
            # "from pkg import sub" imports the module pkg.sub when there is one
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            deps.update(subs or [mod])
        graph[name] = deps
    return graph


def test_only_the_allowed_arrows_exist() -> None:
    bad = []
    for mod, deps in _graph().items():
        src = mod.split(".")[0]
        for dep in deps:
            dst = dep.split(".")[0]
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "forbidden imports:\n" + "\n".join(sorted(bad))


def test_config_reads_the_architecture_from_model_spec_only() -> None:
    """Configs embed plain descriptions only (no torch, no numba in a config)."""
    deps = {d for m, ds in _graph().items() if m.startswith("config") for d in ds if d.startswith(("model", "alerts"))}
    assert deps == {"model.spec", "alerts.limits"}


def test_bench_uses_public_names_only() -> None:
    for path in (ROOT / "bench").rglob("*.py"):
        for mod, names in _imports(path):
            if _ours(mod):
                assert not mod.startswith("tests"), f"{path.name} imports test code ({mod})"
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name} imports private names {private} from {mod}"


def test_no_module_takes_part_in_a_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_forbidden_arrow(tmp_path: Path) -> None:
    """The parser must catch a function-level import (so the tests above can fail)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from consumer.daemon import StreamProcessor\n")
    assert ("consumer.daemon", ["StreamProcessor"]) in _imports(f)

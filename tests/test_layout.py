"""The package's layering, as docs/architecture.md draws it: which folder may import which, no cycles, no reaching
into another folder's private names. Read from the source (every import, top-level or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "src" / "stackrlhf"
# a folder may not import these (by the layering: models below the stages; evaluate and feedback side by side)
FORBIDDEN = {
    "models": {"train", "rl", "evaluate", "feedback", "pipeline", "loop", "cli"},
    "data": {"models", "train", "rl", "evaluate", "feedback", "pipeline", "loop", "cli"},
    "evaluate": {"feedback", "train", "rl", "pipeline", "loop", "cli"},
    "feedback": {"evaluate", "train", "rl", "pipeline", "loop", "cli"},
    "train": {"rl", "feedback", "pipeline", "loop", "cli"},  # train reports an RM through evaluate/
    "rl": {"train", "evaluate", "feedback", "pipeline", "loop", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every ``stackrlhf`` import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("stackrlhf")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stackrlhf"):
            out.append((node.module, [a.name for a in node.names]))
    return out


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, list[tuple[str, list[str]]]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_folders_import_only_downward():
    wrong = [f"{mod} imports {target}" for mod, deps in graph().items() for target, _ in deps
             if folder(target) in FORBIDDEN.get(folder(mod), set())]
    assert not wrong, wrong


def test_no_private_names_across_folders():
    wrong = [f"{mod} takes {name} from {target}" for mod, deps in graph().items() for target, names in deps
             for name in names if name.startswith("_") and not name.startswith("__") and folder(target) != folder(mod)]
    assert not wrong, wrong


def test_no_import_cycle():
    g = graph()
    edges = {m: sorted({t if t in g else t.rsplit(".", 1)[0] for t, _ in deps} & set(g) - {m}) for m, deps in g.items()}
    # a package imports its own modules only through its __init__; a module importing its package is not a cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above can fail: a models/ file importing rl/ is reported."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from stackrlhf.rl.ppo import PPOTrainer\n")
    deps = imports(bad)
    assert deps == [("stackrlhf.rl.ppo", ["PPOTrainer"])]
    assert folder(deps[0][0]) in FORBIDDEN["models"]

"""The package's shape, checked: which folder may import which, where Hydra and exit codes
live, how many entries the root holds, and how long a function may grow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vae_cli"
# Each folder and the folders it may import from (besides itself, errors and tokens).
# Maths and networks sit at the bottom; commands at the top.
ALLOWED = {
    "nets": set(),
    "objective": {"nets"},
    "runtime": set(),
    "data": {"runtime"},
    "evaluation": {"objective", "data", "runtime"},
    # post-hoc samplers train on codes the trained model gives them: above the maths
    "samplers": {"objective", "nets", "data", "evaluation", "runtime"},
    "config": {"objective", "nets", "data", "runtime", "samplers"},
    "export": {"config", "objective", "nets", "runtime"},
    "reports": {"objective", "data", "evaluation", "runtime"},
    "training": {"config", "objective", "data", "evaluation", "reports", "runtime"},
    "commands": {"config", "objective", "data", "evaluation", "samplers", "export",
                 "reports", "runtime", "training"},
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def _imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _folder(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def test_folders_import_only_what_sits_below_them():
    bad = []
    for path, tree in _modules():
        here = _folder(path)
        if here not in ALLOWED:
            continue
        for name in _imports(tree):
            parts = name.split(".")
            if parts[0] != "vae_cli" or len(parts) < 2 or parts[1] in (here, "errors",
                                                                          "tokens"):
                continue
            if parts[1] not in ALLOWED[here]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, bad
    assert set(ALLOWED) | {"configs"} >= {p.name for p in PACKAGE.iterdir()
                                          if p.is_dir() and p.name != "__pycache__"}


def test_only_commands_know_hydra_apps_and_exit_codes():
    bad = []
    for path, tree in _modules():
        if _folder(path) == "commands" or path.name == "__main__.py":
            continue
        if any(n == "hydra" or n.startswith("hydra.") for n in _imports(tree)):
            bad.append(f"{path.relative_to(PACKAGE)} imports hydra")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "exit"
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                bad.append(f"{path.relative_to(PACKAGE)} calls sys.exit")
    assert not bad, bad


def test_the_root_holds_few_entries_and_functions_stay_short():
    root = [p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(root) <= 15, root  # 11 folders, errors, tokens, __init__, __main__
    long = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert not long, long

"""The package's shape, checked: which folder may import which, where Hydra and exit codes
live, how many entries the root holds, and how long a function may grow."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parents[1] / "vae_cli"
CONFIGS = PACKAGE.parent / "configs"
# Each folder and the folders it may import from (besides itself, errors and tokens).
# Maths and networks sit at the bottom; commands at the top.
ALLOWED = {
    "nets": set(),
    "objective": {"nets"},
    "runtime": set(),
    "data": {"runtime"},
    "evaluation": {"objective", "nets", "data", "runtime"},
    # post-hoc samplers train on codes the trained model gives them: above the maths
    "samplers": {"objective", "nets", "data", "evaluation", "runtime"},
    "config": {"objective", "nets", "data", "runtime", "samplers"},
    "export": {"config", "objective", "nets", "runtime"},
    "reports": {"objective", "data", "evaluation", "runtime"},
    "training": {"config", "objective", "data", "evaluation", "reports", "runtime"},
    "commands": {"config", "objective", "nets", "data", "evaluation", "samplers", "export",
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


def _yaml_targets(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["_target_"]} if isinstance(node.get("_target_"), str) else set()
        return found.union(*(_yaml_targets(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_yaml_targets(v) for v in node))
    return set()


def _group_targets(group: str) -> set[str]:
    """The vae_cli targets a config group's options name."""
    found: set[str] = set()
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        found |= _yaml_targets(yaml.safe_load(path.read_text()))
    return {t for t in found if t.startswith("vae_cli.")}


def _instantiated_groups(tree: ast.Module) -> set[str]:
    """Groups a module builds from config: instantiate("<group>", ...) calls."""
    groups = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "instantiate"):
            groups.add(node.args[0].value)
    return groups


def test_yaml_targets_are_built_only_where_their_folder_may_be_imported():
    """Building a component from its YAML _target_ is an import at run time: the module that
    instantiates a group must sit where it may import every target of that group."""
    bad, seen = [], set()
    for path, tree in _modules():
        here = _folder(path)
        for group in _instantiated_groups(tree):
            seen.add(group)
            for target in _group_targets(group):
                there = target.split(".")[1]
                if here in ALLOWED and there not in ALLOWED[here] | {here, "errors", "tokens"}:
                    bad.append(f"{path.relative_to(PACKAGE)} builds {group}: {target}")
    assert not bad, bad
    assert {"dataset", "model", "prior", "logger", "lr_scheduler", "optim", "sampler"} <= seen


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

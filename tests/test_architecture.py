"""Capabilities live on registry entries: no code outside the file that registers a method, strategy or
scenario compares a string against its name (``name == "lora"``, ``name in ("naive", "ewc")``)."""

import ast
from pathlib import Path

import avl_peft
from avl_peft.adapters import METHODS
from avl_peft.cl.scenarios import SCENARIOS
from avl_peft.cl.strategies import STRATEGIES

PACKAGE = Path(avl_peft.__file__).resolve().parent


def registered_names() -> dict[str, set[Path]]:
    """Every registered name -> the files allowed to compare against it (those that register it)."""
    allowed: dict[str, set[Path]] = {}
    for registry in (METHODS, STRATEGIES, SCENARIOS):
        for name in registry.names():
            allowed.setdefault(name, set()).add(Path(registry.origin(name)).resolve())
    return allowed


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def name_checks(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every ==, !=, in, not in comparison against one of ``names`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            continue
        for operand in (node.left, *node.comparators):
            found += [(node.lineno, s) for s in _strings(operand) if s in names]
    return found


def test_the_scanner_finds_name_checks():
    source = 'if cfg["strategy"] == "naive":\n    pass\nok = method in ("lora", "other")\nfine = x == "lorax"\n'
    assert name_checks(source, {"naive", "lora"}) == [(1, "naive"), (3, "lora")]


def test_no_name_checks_outside_registering_files():
    allowed = registered_names()
    assert {"lora", "naive", "synthetic"} <= set(allowed)  # the scan is over real names
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, name in name_checks(path.read_text(), set(allowed)):
            if path.resolve() not in allowed[name]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} compares against '{name}'")
    assert not violations, "use a capability on the registry entry instead:\n" + "\n".join(violations)

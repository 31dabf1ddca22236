"""The package's layering, read from the source (every import, lazy ones inside functions too):
data flows cli → api → services → domain modules, never back up, and no module imports itself
through others at import time."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kifmerge"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module == "kifmerge.cli" or module.startswith("kifmerge.cli.") or module == "kifmerge.__main__":
        return "cli"
    if module == "kifmerge.api":
        return "api"
    if module == "kifmerge.services" or module.startswith("kifmerge.services."):
        return "services"
    return "domain"


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported kifmerge module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top_level) for name in names if name == "kifmerge" or name.startswith("kifmerge.")]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        targets = []
        for target, eager in imports(path):
            while target not in modules and "." in target:  # `from kifmerge.x import function`
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                targets.append((target, eager))
        out[name] = sorted(set(targets))
    return out


ALLOWED = {"cli": {"cli", "api", "services", "domain"}, "api": {"api", "services", "domain"},
           "services": {"services", "domain"}, "domain": {"domain"}}


def test_no_module_imports_a_layer_above_its_own():
    broken = [f"{source} ({layer(source)}) imports {target} ({layer(target)})"
              for source, targets in graph().items() for target, _ in targets if layer(target) not in ALLOWED[layer(source)]]
    assert not broken, "\n".join(broken)


def test_no_import_cycle_at_import_time():
    """Module-level imports only: a lazy import inside a function runs after both modules loaded."""
    eager = {source: [t for t, at_top in targets if at_top] for source, targets in graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in eager.get(node, []):
            if state.get(target) == 1:
                cycles.append(" → ".join(path[path.index(target):] + [target]) if target in path else f"{node} → {target}")
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in eager:
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_cli_reaches_the_services_through_the_api_only():
    direct = [f"{source} imports {target}" for source, targets in graph().items() if layer(source) == "cli"
              for target, _ in targets if layer(target) == "services"]
    assert not direct, "\n".join(direct)


def test_modules_stay_small_and_no_service_shares_a_domain_modules_name():
    """A newcomer finds one concern per module: none over 650 lines, and `services/fusing.py` is
    never confused with `fusion/` (a service is named for what it does)."""
    too_long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 650}
    assert not too_long, too_long
    domain = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    services = {p.stem for p in (PACKAGE / "services").glob("*.py")} - {"__init__", "common"}
    assert not services & domain, services & domain

"""The package's floors (docs/design.md): a module imports only its own floor or lower ones.

Every ``import`` of every module of ``src/trackflow`` counts, those inside functions and under
``TYPE_CHECKING`` included; each forbidden arrow is reported as ``file:line``.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "trackflow"

# room (first name under trackflow) -> floor
FLOORS = {
    "__init__": 0, "errors": 0, "files": 0, "device": 0,
    "data": 1, "geometry": 1,
    "models": 2,
    "experiment": 3,
    "training": 4, "tracking": 4,
    "evaluation": 5,
    "visualization": 6,
    "cli": 7,
}
# rooms of one floor that must not import each other
SEPARATE = [{"training", "tracking"}]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path):
    """(line, absolute module name) of every trackflow import of ``path``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from trackflow import errors` imports the room named after `from`
            names = {f"{base}.{alias.name}" if base == "trackflow" else base for alias in node.names}
        else:
            continue
        for name in sorted(names):
            if name == "trackflow" or name.startswith("trackflow."):
                yield node.lineno, name


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def forbidden_arrows() -> list[str]:
    arrows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = room(module_name(path))
        for line, target_module in imported_modules(path):
            target = room(target_module)
            where = f"{path.relative_to(PACKAGE.parent.parent)}:{line}"
            if source not in FLOORS or target not in FLOORS:
                arrows.append(f"{where}: room {source if source not in FLOORS else target!r} has no floor")
            elif FLOORS[target] > FLOORS[source]:
                arrows.append(f"{where}: {source} (floor {FLOORS[source]}) imports {target_module} "
                              f"(floor {FLOORS[target]})")
            elif {source, target} in SEPARATE:
                arrows.append(f"{where}: {source} imports {target_module} (they must not import each other)")
    return arrows


def test_every_room_has_a_floor():
    rooms = {room(module_name(path)) for path in PACKAGE.rglob("*.py")}
    assert rooms <= set(FLOORS), f"rooms without a floor: {sorted(rooms - set(FLOORS))}"


def test_imports_only_go_down_the_floors():
    arrows = forbidden_arrows()
    assert not arrows, "forbidden imports:\n" + "\n".join(arrows)

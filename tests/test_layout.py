"""The tree shows the architecture: sub-packages by concept, imports pointing downward only.

Every ``import`` in ``trainer/`` (top-level and inside functions alike) is parsed, so an upward
import hidden in a function fails here too. The order is the one ``trainer/__init__.py`` states.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "trainer"

# A package may import itself and the packages of a lower rank; peers of one rank may not import
# each other (train and tools are independent clients of generate).
RANK = {"core": 0, "config": 1, "data": 2, "models": 2, "lora": 3, "generate": 4, "train": 5, "tools": 5, "cli": 6}
MAX_MODULE_LINES = 450  # "a few hundred lines at most" (STYLE.md); split a module before it grows past this


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "trainer" and len(parts) > 1 and parts[1] in RANK else None


MODULES = _modules(TRAINER)


def test_every_sub_package_is_ranked_and_documented() -> None:
    packages = {p.name for p in TRAINER.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(RANK)
    for name in packages:
        doc = ast.get_docstring(ast.parse((TRAINER / name / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 25, f"trainer/{name}/__init__.py needs a paragraph on what it owns"
        assert "Imports" in doc or "import" in doc.lower(), f"trainer/{name}/__init__.py should say what it may import"
    loose = sorted(p.name for p in TRAINER.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside any sub-package: {loose}"


def test_imports_point_downward_and_never_reach_the_gui() -> None:
    wrong = []
    for module, path in MODULES.items():
        own = _package(module)
        for line, target in _imports(path):
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            root = target.split(".")[0]
            if root in ("app", "gradio", "gradio_client"):
                wrong.append(f"{where} (the engine never imports the GUI)")
                continue
            other = _package(target)
            if own is None or other is None or other == own:
                continue
            if RANK[other] >= RANK[own]:
                wrong.append(f"{where} ({own} may not import {other})")
    assert wrong == []


def test_no_import_cycle_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        graph[module] = {t for _, t in _imports(path) if t in MODULES and t != module and not module.startswith(t + ".")}
    # a package's __init__ is imported by its own modules implicitly: only explicit edges count here
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("root", ["trainer", "app"])
def test_modules_are_short_and_not_named_after_their_package(root: str) -> None:
    long, repeated = [], []
    for module, path in _modules(REPO / root).items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(REPO)}: {lines} lines")
        parts = module.split(".")
        if len(parts) >= 3 and parts[-2] in parts[-1]:
            repeated.append(module)
    assert long == [] and repeated == []


@pytest.mark.parametrize("old, new", [
    ("trainer.loop", "trainer.train.loop"),
    ("trainer.formats", "trainer.lora.writing"),
    ("trainer.dataset", "trainer.data.scan"),
    ("trainer.errors", "trainer.core.errors"),
    ("trainer.tools_resize", "trainer.tools.resize"),
])
def test_old_module_paths_still_import_with_a_warning(old: str, new: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_every_moved_path_points_at_a_module() -> None:
    from trainer.core.moved import MOVED_MODULES

    assert set(MOVED_MODULES.values()) <= set(MODULES)
    assert not set(MOVED_MODULES) & set(MODULES)


def test_public_names_of_01_still_resolve() -> None:
    from trainer.generate import Generator
    from trainer.generate.generator import Generator as defined
    from trainer.train.loop import train

    assert Generator is defined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import trainer.loop as old_loop

        from trainer.models import load_base_model
    from trainer.models.loading import load_base_model as loader

    assert old_loop.train is train and load_base_model is loader
    from trainer.config import StudioConfig
    from trainer.config.schema import StudioConfig as schema_config

    assert StudioConfig is schema_config
    with pytest.raises(ImportError):
        from trainer.generate import NoSuchName  # noqa: F401

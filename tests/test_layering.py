"""Imports point downward only: tools -> engine -> data / modeling / evaluation / checkpoint /
solver / io -> config. A module importing a layer above its own (say data importing engine) ties
the low layer to everything above it and soon makes an import cycle; this test names it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "virtex_d2"
# Layer of each top-level part of the package; modules of one layer may import each other.
LAYERS = {
    "config": 0,
    **dict.fromkeys(["data", "modeling", "evaluation", "checkpoint", "solver", "io"], 1),
    "engine": 2,
}
TOOLS = 3
# The package's own __init__ registers datasets and models when ``virtex_d2`` is imported: it
# sits with the middle layer, so importing the package never pulls in the engine.
ROOT_LAYER = 1


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_our_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, relative ones resolved,
    including imports inside functions (they run too)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + [target]).rstrip(".")
            for alias in node.names:
                # "from .. import io" imports the module virtex_d2.io, not a name of virtex_d2.
                full = f"{target}.{alias.name}"
                yield node.lineno, full if is_our_module(full) else target


def tool_module_names() -> set[str]:
    """What the tools import each other as (they run with tools/ on sys.path)."""
    tools = REPO / "tools"
    return {p.stem for p in tools.glob("*.py")} | {p.name for p in tools.iterdir() if p.is_dir()}


def layer_of(module: str) -> int | None:
    """Layer of a module of ours; None for other packages and for modules not judged."""
    parts = module.split(".")
    if parts[0] == "tools" or parts[0] in tool_module_names():
        return TOOLS
    if parts[0] != "virtex_d2":
        return None
    if len(parts) == 1:
        return ROOT_LAYER
    return LAYERS[parts[1]]


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    """One line per import in ``path`` (or ``source``, read as if it were ``path``) that
    points to a layer above the module's own."""
    module = module_name(path)
    own = layer_of(module)
    text = path.read_text() if source is None else source
    found = []
    for line, target in imported_modules(text, module, path.name == "__init__.py"):
        layer = layer_of(target)
        if layer is not None and layer > own:
            found.append(
                f"{path.relative_to(REPO)}:{line} ({module}, layer {own}) imports "
                f"{target} (layer {layer})"
            )
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
    }
    assert parts - {"__init__"} == set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    files = list(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    problems = [line for path in sorted(files) for line in upward_imports(path)]
    assert not problems, "imports pointing up a layer:\n" + "\n".join(problems)


def test_the_check_sees_relative_absolute_and_local_imports():
    data = PACKAGE / "data" / "caption_mapper.py"
    bad = "from ..engine.checkpoint import build_checkpointer\n"
    assert len(upward_imports(data, bad)) == 1
    assert len(upward_imports(data, "def f():\n    import virtex_d2.engine.trainer\n")) == 1
    assert len(upward_imports(data, "from ..engine import predictor\n")) == 1
    assert (
        upward_imports(
            data,
            "from ..config import DECODERS\nfrom ..io import atomic_write\n"
            "from .. import io\nimport torch\n",
        )
        == []
    )
    config = PACKAGE / "config.py"
    assert len(upward_imports(config, "from .data.tokenizer import SOS_ID\n")) == 1
    engine = PACKAGE / "engine" / "predictor.py"
    assert len(upward_imports(engine, "from caption_images import main\n")) == 1

"""No import runs up the layers: every module of the project's packages imports only its own package and the
packages of lower layers, read from the source with ast (imports inside functions count too; a lazy import is
still a dependency).

The layers, bottom to top (README "Layout"):

    0  fsutil          durable writes, hashes, JSON lines, the file lock; no torch
    1  ebt             the model, its thinking loop, System-2 inference and generation (tensors, no tokenizer)
    1  data_pipeline   tokenizers, corpora, shards, loaders
    2  planning        the memory planner, resolved before the model is built (reads ebt's config and model)
    3  launch          the trainer, run dirs, checkpoints, the `ebt` CLI and `ebt generate`'s text side
    4  eval            perplexity, System-2 grids, downstream tasks, scoring, reports
    5  slurm           sweeps on submitit, built on launch's configs and trainer
    6  benchmarks      measurements of everything below

ebt and data_pipeline share a layer and import nothing of each other. tests/ is not checked (tests import
anything), and nothing outside benchmarks/ and tests/ may import benchmarks or tests. A package that does not
exist in the tree is skipped.

launch/cli.py registers the commands of eval and slurm by name (`COMMAND_MODULES`, importlib): the CLI is the
one composition root above which nothing is statically imported; that dynamic registry is not an ast import and
is checked on its own below.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    "fsutil": 0,
    "ebt": 1,
    "data_pipeline": 1,
    "planning": 2,
    "launch": 3,
    "eval": 4,
    "slurm": 5,
    "benchmarks": 6,
}
NOT_IMPORTABLE = {"tests"}  # by any package (benchmarks sit on top and may import every layer)

# (importing module, imported package): an upward import that is intended, with the reason.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth; relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                found.append((node.lineno, ".".join([*base, node.module] if node.module else base)))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def package_modules() -> list[tuple[str, Path]]:
    return [(package, path) for package in LAYERS if (ROOT / package).is_dir()
            for path in sorted((ROOT / package).rglob("*.py"))]


def test_no_import_runs_up_the_layers():
    upward, used = [], set()
    for package, path in package_modules():
        where = path.relative_to(ROOT).as_posix()
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top == package:
                continue
            if top in NOT_IMPORTABLE:
                upward.append(f"{where}:{line} imports {module} (nothing imports the tests)")
            elif top in LAYERS and (LAYERS[top] > LAYERS[package]
                                    or (LAYERS[top] == LAYERS[package] and top != package)):
                if (where, top) in EXCEPTIONS:
                    used.add((where, top))
                    continue
                upward.append(f"{where}:{line} imports {module}: {package} (layer {LAYERS[package]}) may not "
                              f"import {top} (layer {LAYERS[top]})")
    assert not upward, "imports that run up the layers (tests/test_layers.py):\n" + "\n".join(upward)
    assert used == set(EXCEPTIONS), f"exceptions no longer needed, remove them: {set(EXCEPTIONS) - used}"


def test_every_package_is_in_a_layer():
    """A new top-level package must be placed in LAYERS (and the README's layout) before it is imported."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_IMPORTABLE
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}"


def test_the_cli_registry_is_the_only_way_down_from_the_top():
    """launch/cli.py names its command modules as strings; each is launch's own or the register() of a package
    above (eval, slurm), which is how `ebt eval` and `ebt sweep` reach the one entry point."""
    tree = ast.parse((ROOT / "launch" / "cli.py").read_text())
    names = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.AnnAssign | ast.Assign)
                 and "COMMAND_MODULES" in ast.unparse(node.targets[0] if isinstance(node, ast.Assign)
                                                       else node.target))
    for name in names:
        top = name.split(".")[0]
        assert top in LAYERS, name
        assert top == "launch" or name.endswith(".cli"), f"{name}: the CLI registers only other packages' cli.py"


def test_the_layer_test_sees_imports_inside_functions_and_relative_ones():
    """The parser finds lazy and relative imports (what would let an upward import slip through)."""
    path = ROOT / "data_pipeline" / "api.py"
    modules = {module for _, module in imported_modules(path)}
    assert "data_pipeline.config" in modules  # `from .config import ...`
    lazy = ROOT / "launch" / "generate.py"
    assert any(module.startswith("ebt.") for _, module in imported_modules(lazy))  # inside _generate

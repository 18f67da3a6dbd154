"""The package's shape: imports run one way, and every command's --help prints help.

Layers, top to bottom: cli / api / serve / gates / demo -> engine -> bundle -> models; convert sits beside
the engine and reads checkpoints into bundles (convert -> bundle / models); the Python API (api) may convert
a checkpoint it is given, and the CLI runs on it. A module may import its own
package and any layer below it, never one above (also not under TYPE_CHECKING).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from lmbundle.cli import build_parser

PACKAGE = Path(__file__).resolve().parents[1] / "lmbundle"
# what each part of the package may import from the others
ALLOWED = {
    "models": {"errors"},
    "bundle": {"models", "errors"},
    "convert": {"bundle", "models", "errors", "quiet"},
    "engine": {"bundle", "models", "errors", "quiet"},
    "gates": {"engine", "convert", "bundle", "models", "errors", "quiet"},
    "serve": {"engine", "bundle", "models", "errors"},
    "api": {"engine", "convert", "bundle", "models", "errors"},
    "cli": {"api", "engine", "convert", "gates", "serve", "bundle", "models", "errors", "quiet"},
    "demo": {"engine", "convert", "gates", "bundle", "models", "errors", "quiet"},
    "errors": set(),
    "quiet": set(),  # the known-harmless library messages, silenced in one place (a leaf, like errors)
    "__main__": {"cli"},
}


def _part(module: str) -> str:
    """lmbundle.engine.kernels.triton_ops -> engine; lmbundle.cli -> cli; lmbundle -> '' (the version)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute lmbundle module) of every import in a file, relative ones resolved."""
    module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name == "lmbundle" or name.startswith("lmbundle.")]


def layering_violations(root: Path) -> list[str]:
    wrong = []
    for path in sorted(root.rglob("*.py")):
        own = _part(".".join(path.relative_to(root.parent).with_suffix("").parts))
        if own == "":  # lmbundle/__init__.py
            continue
        for line, target in _imports(path, root):
            other = _part(target)
            if other not in ("", own, "__version__") and other not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(root.parent)}:{line} imports {target}")
    return wrong


def test_imports_run_one_way():
    wrong = layering_violations(PACKAGE)
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layering_check_sees_violations(tmp_path):
    """The checker itself, on a made-up package: an upward relative import and an upward absolute one
    under TYPE_CHECKING are both caught; a downward one is not."""
    engine, models = tmp_path / "lmbundle" / "engine", tmp_path / "lmbundle" / "models"
    engine.mkdir(parents=True)
    models.mkdir()
    (engine / "step.py").write_text("from ..cli import main\nfrom ..models.ops import StepOps\n")
    (models / "graph.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                     "    from lmbundle.engine.step import x\n")
    assert layering_violations(tmp_path / "lmbundle") == [
        "lmbundle/engine/step.py:1 imports lmbundle.cli",
        "lmbundle/models/graph.py:3 imports lmbundle.engine.step",
    ]


COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("args", [[], *[[command] for command in COMMANDS]], ids=lambda a: " ".join(a) or "top")
def test_every_help_prints_help(args):
    done = subprocess.run([sys.executable, "-m", "lmbundle", *args, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: lmbundle") and "Traceback" not in done.stderr

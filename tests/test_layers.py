"""The package's layer rules (modeling_nanochat/README.md), checked on every import statement, function-level ones
included: an arrow against the rules fails here with the file, the line and the rule it breaks."""

import ast
import shutil
from pathlib import Path

from conftest import REPO

PACKAGE = "modeling_nanochat"
# What ships inside every checkpoint: these import only torch, transformers and each other.
CHECKPOINT_FILES = ("configuration_nanochat", "modeling_nanochat")
FOUNDATION = ("utils", "tokenizer", "generation", "optim", "data", "checkpoints", "adapters", "engines")
STAGES = ("pretrain", "sft", "rl", "compression")
APPS = ("apps",)
# Outside the library: nothing in modeling_nanochat/ or evaluation/ may import these.
NEVER = ("recipes", "bench", "tests", "app", "conftest")
REMOTE_CODE_THIRD_PARTY = ("torch", "transformers")


def layer_of(module: str) -> str:
    """'root', a subpackage name of the library, 'evaluation', or 'outside' for anything else."""
    parts = module.split(".")
    if parts[0] == "evaluation":
        return "evaluation"
    if parts[0] != PACKAGE:
        return "outside"
    if len(parts) == 1 or parts[1] in CHECKPOINT_FILES or parts[1] == "__init__":
        return "root"
    return parts[1]


def allowed(src: str, dst: str) -> bool:
    """May code in layer `src` import from layer `dst` (both from layer_of)?"""
    if dst == "outside" or src == dst:
        return True
    if src == "root":
        return False  # the checkpoint's files import only each other (checked with their third-party imports)
    if src == "utils":
        return False  # the bottom: plain helpers with no package imports
    if src in FOUNDATION or src == "evaluation":
        return dst == "root" or dst in FOUNDATION
    if src in STAGES:
        return dst == "root" or dst in FOUNDATION or dst == "evaluation"
    if src in APPS:
        return True
    raise AssertionError(f"{src!r} is no layer: add the new subpackage to tests/test_layers.py and the README")


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path):
    """(line, imported module) for every import in the file, relative ones resolved against its package."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if node.module is None or node.level and not node.module:
                for alias in node.names:  # `from . import x` / `from pkg import submodule`
                    yield node.lineno, f"{target}.{alias.name}"
            else:
                yield node.lineno, target


def violations(root: Path) -> list[str]:
    """Every import in root/modeling_nanochat and root/evaluation that breaks a layer rule."""
    found = []
    for top in (PACKAGE, "evaluation"):
        for path in sorted((root / top).rglob("*.py")):
            src = layer_of(module_name(path, root))
            for line, target in imports_of(path, root):
                where = f"{path.relative_to(root)}:{line} imports {target}"
                head = target.split(".")[0]
                if head in NEVER:
                    found.append(f"{where}: the library never imports scripts, tests or the app")
                elif src == "root" and layer_of(target) != "root" and head not in REMOTE_CODE_THIRD_PARTY \
                        and head != "__future__" and not _stdlib(head):
                    found.append(f"{where}: checkpoint files import only torch, transformers and each other")
                elif not allowed(src, layer_of(target)):
                    found.append(f"{where}: {src} may not import {layer_of(target)}")
    return found


def _stdlib(name: str) -> bool:
    import sys
    return name in sys.stdlib_module_names


def test_the_package_keeps_its_layer_rules():
    assert violations(REPO) == []


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in (REPO / PACKAGE).iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(FOUNDATION + STAGES + APPS)
    root_files = {p.name for p in (REPO / PACKAGE).glob("*.py")}
    assert root_files == {"__init__.py", "configuration_nanochat.py", "modeling_nanochat.py"}


def _copy(tmp_path: Path) -> Path:
    for top in (PACKAGE, "evaluation"):
        shutil.copytree(REPO / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _add(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n\ndef _added():\n    {line}\n")


def test_a_forbidden_arrow_fails(tmp_path):
    """Each kind of wrong arrow, added to a copy of the package inside a function body, is reported."""
    root = _copy(tmp_path)
    assert violations(root) == []
    cases = [
        (f"{PACKAGE}/optim/scaling.py", "from evaluation.core import evaluate_core", "optim may not import evaluation"),
        (f"{PACKAGE}/tokenizer/chat_format.py", "from modeling_nanochat.sft import data",
         "tokenizer may not import sft"),
        (f"{PACKAGE}/sft/trainer.py", "from modeling_nanochat.pretrain.trainer import Pretrainer",
         "sft may not import pretrain"),
        (f"{PACKAGE}/rl/trainer.py", "from modeling_nanochat.apps import chat", "rl may not import apps"),
        ("evaluation/core.py", "from modeling_nanochat.pretrain import trainer", "evaluation may not import pretrain"),
        (f"{PACKAGE}/utils/distributed.py", "from ..tokenizer import tokenizer", "utils may not import tokenizer"),
        (f"{PACKAGE}/modeling_nanochat.py", "import numpy", "checkpoint files import only"),
        (f"{PACKAGE}/apps/chat.py", "import recipes.sft", "never imports scripts"),
    ]
    for file, line, message in cases:
        original = (root / file).read_text()
        _add(root / file, line)
        found = violations(root)
        assert len(found) == 1 and message in found[0] and file in found[0], (file, found)
        (root / file).write_text(original)
    assert violations(root) == []

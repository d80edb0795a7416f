"""The package's rooms (docs/architecture.md): a docstring for every subpackage, modules within their size limits,
remote-code files that import no tooling, and every subcommand module registered."""

import argparse
import ast
import importlib
from pathlib import Path

import pytest

import flashsloth
from flashsloth.cli import SUBCOMMAND_MODULES, build_parser


PACKAGE_DIR = Path(flashsloth.__file__).resolve().parent
MODELING_FILE = PACKAGE_DIR / "modeling_flashsloth.py"
MODULE_MAX_LINES, MODELING_MAX_LINES = 500, 700
# The remote-code files: every `*_flashsloth.py` of the package folder and of `processing/`.
REMOTE_CODE_FILES = sorted([*PACKAGE_DIR.glob("*_flashsloth.py"), *(PACKAGE_DIR / "processing").glob("*_flashsloth.py")])
# The embedded checkpoint's copies of the remote code are data, checked against the package's files in test_demo.py.
MODULES = sorted(path for path in PACKAGE_DIR.rglob("*.py") if "model" not in path.relative_to(PACKAGE_DIR).parts[:-1])


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE_DIR)))
def test_module_is_within_its_size_limit(path):
    limit = MODELING_MAX_LINES if path == MODELING_FILE else MODULE_MAX_LINES
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= limit, f"{path.relative_to(PACKAGE_DIR)} has {lines} lines, more than {limit}: split it by concern"


@pytest.mark.parametrize(
    "package", sorted({path.parent for path in MODULES if path.name == "__init__.py"}), ids=lambda path: path.name
)
def test_every_room_says_what_it_is_for(package):
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8")))
    assert docstring and len(docstring.split()) >= 8, f"{package.name}/__init__.py needs a docstring saying its job"


def test_the_remote_code_files_are_the_model_and_processing_files():
    names = {path.name for path in REMOTE_CODE_FILES}
    assert {"configuration_flashsloth.py", "modeling_flashsloth.py", "processing_flashsloth.py"} <= names
    assert "image_processing_flashsloth.py" in names


@pytest.mark.parametrize("path", REMOTE_CODE_FILES, ids=lambda path: path.name)
def test_remote_code_imports_no_tooling(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{path.name}: only single-dot imports of the other remote-code files"
            assert not (node.module or "").startswith("flashsloth"), f"{path.name} imports {node.module}"


@pytest.mark.parametrize("module_name", SUBCOMMAND_MODULES)
def test_every_subcommand_module_adds_its_commands(module_name):
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    module.add_commands(subparsers)
    assert subparsers.choices, f"{module_name}.add_commands added no command"
    room = module_name.rsplit(".", 1)[0] if module_name.count(".") > 1 else module_name
    for name, command in subparsers.choices.items():
        assert command.description, f"`flashsloth {name}` has no description for --help"
        assert command.get_default("handler").__module__.startswith(room), name
    everything = build_parser()._subparsers._group_actions[0].choices
    assert set(subparsers.choices) <= set(everything)


def test_the_command_line_starts_without_torch_or_transformers():
    import subprocess
    import sys

    code = "import sys, flashsloth.cli as c; c.build_parser(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr

"""
transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) for the installed transformers version.

They ship in the sdist of every transformers release (`tests/test_modeling_common.py`), not in its wheel. The first
call downloads that sdist with pip, extracts only the test files needed, and caches them under
`~/.cache/flashsloth/transformers-tests/<version>/` (`FLASHSLOTH_CACHE` moves `~/.cache/flashsloth`); later calls
import the cached files. The extracted folder becomes the package `transformers_common_tests`, added to `sys.path`
here, so that no conftest is needed and our own `tests/` folder keeps its name.

The sdist holds only the top-level test files: the three modules they import from sub-folders of transformers'
repository (`exporters/test_export.py`, `generation/test_utils.py`, `utils/test_configuration_utils.py`) are not in
it, and get small stand-ins here (see `_STAND_INS`): the torch.export mixin and the generation mixin are not run, and
the common config kwargs are only read by a config check that composite configs skip.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
# The files we run, and every test file they import, found by following their relative imports.
ENTRY_FILES = ("test_modeling_common.py", "test_configuration_common.py")
DOWNLOAD_TIMEOUT_S = 300


class CommonTestsUnavailable(RuntimeError):
    """transformers' common test files could not be had (no network, no pip, or a sdist without them)."""


def cache_dir(version: str = transformers.__version__) -> Path:
    root = Path(os.environ.get("FLASHSLOTH_CACHE", Path.home() / ".cache" / "flashsloth"))
    return root / "transformers-tests" / version


def _relative_imports(source: str) -> set[str]:
    """Module paths (`exporters.test_export`) imported relatively (`from .exporters.test_export import ...`)."""
    return set(re.findall(r"^\s*from \.([\w.]+) import", source, flags=re.MULTILINE))


def _extract_needed(archive: Path, destination: Path) -> None:
    with tarfile.open(archive) as sdist:
        members = {}
        for member in sdist.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) > 2 and parts[1] == "tests":
                members[Path(*parts[2:]).as_posix()] = member
        pending = list(ENTRY_FILES)
        missing = [name for name in ENTRY_FILES if name not in members]
        if missing:
            raise CommonTestsUnavailable(f"the transformers sdist {archive.name} holds no tests/{missing[0]}")
        done = set()
        while pending:
            name = pending.pop()
            if name in done or name not in members:
                continue  # a module the sdist does not ship: a stand-in covers it (`_STAND_INS`)
            done.add(name)
            source = sdist.extractfile(members[name]).read()
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source)
            for module in _relative_imports(source.decode("utf-8")):
                pending.append(module.replace(".", "/") + ".py")
    for folder in [destination, *(path for path in destination.rglob("*") if path.is_dir())]:
        (folder / "__init__.py").touch()


def fetch_common_tests(version: str = transformers.__version__) -> Path:
    """
    The folder holding the `transformers_common_tests` package of transformers `version`, downloaded and extracted on
    the first call. Raises `CommonTestsUnavailable` with the reason when it cannot be had.
    """
    root = cache_dir(version)
    if all((root / PACKAGE / name).is_file() for name in ENTRY_FILES):
        return root
    with tempfile.TemporaryDirectory() as download:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-binary", ":all:", "--no-deps", f"transformers=={version}", "--dest", download,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise CommonTestsUnavailable(f"`pip download transformers=={version}` did not finish: {error}") from error
        archives = sorted(Path(download).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no sdist downloaded"]
            raise CommonTestsUnavailable(
                f"could not download the transformers {version} sdist (network needed once): {detail[0]}"
            )
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root))  # beside the target: the move below stays on one file system
        try:
            _extract_needed(archives[0], staging / PACKAGE)
            shutil.rmtree(root / PACKAGE, ignore_errors=True)
            os.replace(staging / PACKAGE, root / PACKAGE)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


class _ExportTesterMixin:
    """Stand-in for `tests/exporters/test_export.py`'s mixin (not in the sdist): torch.export tests are not run."""


class _GenerationTesterMixin:
    """Stand-in for `tests/generation/test_utils.py`'s mixin (not in the sdist). Our tester does not inherit it:
    FlashSloth's generation is checked by tests/test_generation.py against the original code's outputs."""


_STAND_INS = {
    "exporters.test_export": {"ExportTesterMixin": _ExportTesterMixin},
    "generation.test_utils": {"GenerationTesterMixin": _GenerationTesterMixin},
    # Read only by ConfigTester.check_config_arguments_init, which returns early for configs with sub-configs.
    "utils.test_configuration_utils": {"config_common_kwargs": {}},
}


def load_common_tests(version: str = transformers.__version__) -> tuple[types.ModuleType, types.ModuleType]:
    """`(test_modeling_common, test_configuration_common)` of transformers `version` (see the module docstring)."""
    root = fetch_common_tests(version)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for module_path, names in _STAND_INS.items():
        if (root / PACKAGE / (module_path.replace(".", "/") + ".py")).is_file():
            continue  # shipped after all: use the real one
        parent = PACKAGE
        for part in module_path.split(".")[:-1]:
            parent = f"{parent}.{part}"
            sys.modules.setdefault(parent, types.ModuleType(parent))
        module = types.ModuleType(f"{PACKAGE}.{module_path}")
        module.__dict__.update(names)
        sys.modules.setdefault(module.__name__, module)
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )

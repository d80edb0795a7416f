"""The README and the docs pages: their Python examples run as written, their links and pictures exist, and the
README stays the short way in."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Topic pages are named with hyphens; names with an underscore are tables that a benchmark wrote (speed_small_cpu.md).
TOPIC_PAGES = [page for page in PAGES[1:] if "_" not in page.stem]
NOT_RUN = "# not run by the tests:"
README_MAX_LINES = 250


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def runnable_examples() -> list:
    examples = []
    for page in PAGES:
        for index, block in enumerate(python_blocks(page)):
            if not block.startswith(NOT_RUN):
                examples.append(pytest.param(block, id=f"{page.relative_to(ROOT)}-{index}"))
    return examples


def expected_output(block: str) -> str | None:
    """The comment after the block's last `print(...)`, when it has one: what the example prints last."""
    prints = [line for line in block.splitlines() if line.startswith("print(")]
    if prints and "  # " in prints[-1]:
        return prints[-1].rsplit("  # ", 1)[1].strip()
    return None


@pytest.mark.parametrize("block", runnable_examples())
def test_example_runs(block):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=300, cwd=ROOT, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = expected_output(block)
    if expected is not None:
        assert result.stdout.strip().splitlines()[-1].strip() == expected, result.stdout[-2000:]
    if "FlashSlothConfig(" in block:  # the tiny random-weight model prints the token ids it generated
        generated = ast.literal_eval(result.stdout.strip().splitlines()[-1])
        assert len(generated) == 5 and all(0 <= token < 128 for token in generated)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_skipped_examples_still_compile(page):
    for block in python_blocks(page):
        if block.startswith(NOT_RUN):
            reason = block.splitlines()[0].removeprefix(NOT_RUN).strip()
            assert reason, f"{page.name}: a block that is not run must say why"
            compile(block, str(page), "exec")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_and_pictures_exist(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"https?://", target):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    for page in TOPIC_PAGES:
        assert f"(docs/{page.name}" in readme, f"the README does not link docs/{page.name}"


@pytest.mark.parametrize("page", TOPIC_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_docs_pages_start_by_saying_what_the_reader_can_do(page):
    lines = [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{page.name} starts with its title"
    assert lines[1][0].isalpha(), f"{page.name}: the first line under the title says what the reader can do there"


def test_readme_command_table_lists_every_command():
    from flashsloth.cli import build_parser

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("\n## The command line", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `flashsloth ([a-z-]+)", table, flags=re.MULTILINE))
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert listed == commands, f"listed but missing: {listed - commands}; not listed: {commands - listed}"


def test_architecture_page_names_code_that_exists():
    import importlib
    import inspect

    modules = [
        importlib.import_module(name)
        for name in (
            "flashsloth.modeling_flashsloth",
            "flashsloth.layout_flashsloth",
            "flashsloth.outputs_flashsloth",
            "flashsloth.processing.processing_flashsloth",
            "flashsloth.processing.image_processing_flashsloth",
        )
    ]
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    steps = page.split("## From the image to the next token", 1)[1].split("\n## ", 1)[0]
    names = set(
        re.findall(r"`((?:FlashSloth\w+)(?:\.\w+)?|window_partition|attention_pool|build_query_block_layout)`", steps)
    )
    assert len(names) >= 12
    for name in names:
        owner_name, _, attribute = name.partition(".")
        owners = [getattr(module, owner_name) for module in modules if hasattr(module, owner_name)]
        assert owners, f"docs/architecture.md names {owner_name}, which no model or processing file defines"
        exists = hasattr(owners[0], attribute) or f"self.{attribute} = " in inspect.getsource(owners[0])  # or a module
        assert not attribute or exists, f"docs/architecture.md names {name}, which does not exist"

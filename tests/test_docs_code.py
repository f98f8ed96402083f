"""Code the documentation shows as a repository file is that file's code, verbatim.

A ``python`` block whose first line names a file in a directory of this repository
(``# example_project/tasks.py``), on any page or the README, must appear after that line
as a contiguous part of the file: the pages cannot drift from the code they show. The
tutorial shows its code inline (a code host does not render Sphinx's
``literalinclude``), so each of its ``python`` blocks must name the example file it
comes from.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.markdown_code import DOCS, ROOT, CodeBlock, code_blocks

TUTORIAL = DOCS / "tutorial.md"
#: A ``@shared_task`` decorator line with no argument list, or with one that has no ``name=``.
UNNAMED_TASK = re.compile(r"^[ \t]*@shared_task\b(?!\((?:[^()]|\([^()]*\))*\bname=).*$", re.M)
PAGES = sorted(
    [ROOT / "README.md", *(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)],
    key=str,
)
#: Pages whose task examples must all be registered under an explicit name: every page
#: (an example anywhere teaches the habit).
NAMED_TASK_PAGES = PAGES


def repository_file_blocks(page: Path) -> list[CodeBlock]:
    """The ``python`` blocks of ``page`` that name a file in a directory of this repository
    (``example_project/tasks.py``; the quick start's ``manage.py`` is its own project's)."""
    return [
        block
        for block in code_blocks(page.read_text(encoding="utf-8"))
        if block.language == "python"
        and block.named_file
        and "/" in block.named_file
        and (ROOT / block.named_file).is_file()
    ]


def test_tutorial_has_no_literalinclude() -> None:
    """A code host shows a ``literalinclude`` as nothing at all."""
    text = TUTORIAL.read_text(encoding="utf-8")
    assert "literalinclude" not in text
    assert not [block.line for block in code_blocks(text) if block.language.startswith("{")]


def test_every_tutorial_python_block_names_an_example_file() -> None:
    blocks = [
        block for block in code_blocks(TUTORIAL.read_text(encoding="utf-8")) if block.language == "python"
    ]
    assert blocks, "the tutorial shows no Python code"
    unnamed = [block.line for block in blocks if not (block.named_file or "").startswith("example_project/")]
    assert not unnamed, f"python blocks at lines {unnamed} of the tutorial name no example_project file"
    assert {block.named_file for block in blocks} >= {"example_project/models.py", "example_project/tasks.py"}


@pytest.mark.parametrize(
    ("page", "block"),
    [(page, block) for page in PAGES for block in repository_file_blocks(page)],
    ids=lambda value: value.relative_to(ROOT).as_posix() if isinstance(value, Path) else f"line{value.line}",
)
def test_block_is_verbatim_in_the_file_it_names(page: Path, block: CodeBlock) -> None:
    assert block.named_file is not None
    source = (ROOT / block.named_file).read_text(encoding="utf-8")
    code = block.code.rstrip("\n")
    assert code, f"{page.name} line {block.line}: a block naming {block.named_file} shows no code"
    assert code in source, (
        f"{page.relative_to(ROOT)} line {block.line}: the block is not the code of {block.named_file} "
        "(copy it again from the file)"
    )


@pytest.mark.parametrize("page", NAMED_TASK_PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_task_examples_have_a_name(page: Path) -> None:
    """A task registered under its module path (the default) strands its queued messages
    when the module moves; every example names its task."""
    unnamed = [
        f"line {block.line}: {match.group(0).strip()}"
        for block in code_blocks(page.read_text(encoding="utf-8"))
        if block.language == "python"
        for match in UNNAMED_TASK.finditer(block.text)
    ]
    assert not unnamed, f"{page.relative_to(ROOT)}: @shared_task without name=: {unnamed}"

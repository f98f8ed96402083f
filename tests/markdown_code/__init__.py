"""Fenced code blocks of the Markdown documentation, for tests that run or compare them.

A block "names a file" when its first line is a comment holding only a path, such as
``# proj/celery.py``: that is how the quick start and the tutorial show which file a
block is, in a form a code host displays as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = ROOT / "docs"

# An opening fence (``` or more, with an optional info string), its body, the same fence.
_FENCE = re.compile(r"^(?P<fence>`{3,})(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.S | re.M)
_FILE_COMMENT = re.compile(r"# (?P<path>[\w.-]+(?:/[\w.-]+)*\.py)")


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block: its info string (``python``, ``sh``, ``{literalinclude} …``),
    its text, and the line of the page its opening fence is on."""

    info: str
    text: str
    line: int

    @property
    def language(self) -> str:
        """The first word of the info string (``python``, ``sh``, ``{literalinclude}``)."""
        return self.info.split(maxsplit=1)[0] if self.info.strip() else ""

    @property
    def named_file(self) -> str | None:
        """The path the block's first line names (``# proj/celery.py``), or ``None``."""
        first_line = self.text.split("\n", 1)[0].strip()
        match = _FILE_COMMENT.fullmatch(first_line)
        return match.group("path") if match else None

    @property
    def code(self) -> str:
        """The text after the line naming the file (the whole text if none does)."""
        if self.named_file is None:
            return self.text
        return self.text.split("\n", 1)[1] if "\n" in self.text else ""


def code_blocks(markdown: str) -> list[CodeBlock]:
    """Every fenced code block of a Markdown page, in page order."""
    return [
        CodeBlock(
            info=match.group("info").strip(),
            text=match.group("body"),
            line=markdown.count("\n", 0, match.start()) + 1,
        )
        for match in _FENCE.finditer(markdown)
    ]


def file_blocks(markdown: str, language: str = "python") -> dict[str, CodeBlock]:
    """The blocks of ``language`` that name a file, by path; a path named twice is an
    error (which of the two is the file?)."""
    found: dict[str, CodeBlock] = {}
    for block in code_blocks(markdown):
        path = block.named_file
        if block.language != language or path is None:
            continue
        if path in found:
            raise ValueError(f"{path} is named by two blocks (lines {found[path].line} and {block.line})")
        found[path] = block
    return found


def shell_commands(markdown: str) -> list[str]:
    """The command lines of the ``sh`` blocks, without their trailing comments."""
    commands = []
    for block in code_blocks(markdown):
        if block.language != "sh":
            continue
        for line in block.text.splitlines():
            command = line.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands

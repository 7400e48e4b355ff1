"""The examples of the documentation, read from its pages, so the tests run
them as written: the code blocks of a reStructuredText page."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIAL = DOCS / "tutorial" / "adopt.rst"
"""The tutorial whose ``shop.py`` the tests run."""

DIRECTIVE = re.compile(r"^(?P<indent> *)\.\. code-block:: *(?P<language>\S*)\s*$")
OPTION = re.compile(r"^ *:(?P<name>[\w-]+):(?: +(?P<value>.*))?$")


@dataclass(frozen=True)
class CodeBlock:
    """A ``.. code-block::`` of a page."""

    language: str
    caption: str | None
    code: str


def code_blocks(page: Path) -> list[CodeBlock]:
    """The page's code blocks, in order, their code dedented."""
    lines = page.read_text().splitlines()
    blocks: list[CodeBlock] = []
    at = 0
    while at < len(lines):
        found = DIRECTIVE.match(lines[at])
        at += 1
        if not found:
            continue
        options: dict[str, str] = {}
        while at < len(lines) and (option := OPTION.match(lines[at])):
            options[option["name"]] = option["value"] or ""
            at += 1
        body: list[str] = []
        margin = len(found["indent"]) + 1
        while at < len(lines) and (not lines[at].strip() or _indent(lines[at]) >= margin):
            body.append(lines[at])
            at += 1
        while body and not body[-1].strip():
            body.pop()
        depth = min((_indent(line) for line in body if line.strip()), default=0)
        code = "\n".join(line[depth:] for line in body).strip("\n") + "\n"
        blocks.append(CodeBlock(found["language"], options.get("caption"), code))
    return blocks


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def tutorial_shop() -> str:
    """The tutorial's ``shop.py``: its blocks captioned so, put together in order."""
    return "\n\n".join(block.code for block in code_blocks(TUTORIAL) if block.caption == "shop.py")


def console_commands(page: Path, program: str) -> list[str]:
    """The commands of ``program`` the page's console blocks show (``$ program ...``)."""
    return [
        line.removeprefix("$ ")
        for block in code_blocks(page)
        if block.language == "console"
        for line in block.code.splitlines()
        if line.startswith(f"$ {program} ")
    ]

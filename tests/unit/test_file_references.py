"""Files of this repository named in docstrings and comments exist: a moved or renamed file
leaves no pointer to where it was."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

from machinen_async.store.assets import PACKAGE_DIR

REPO = PACKAGE_DIR.parent
SCANNED = ("machinen_async", "tests", "benchmarks", "examples")
# What a reference may start with: a folder at the top of the repository, or one in the package
# (``hosts/ssh.py`` means machinen_async/hosts/ssh.py).  Other paths (another project's
# ``testing/_check_streams.py``, a guest's ``/etc/...``) are not this repository's to check.
FROM_REPO = {"machinen_async", "tests", "docs", "benchmarks", "examples"}
FROM_PACKAGE = {folder.name for folder in PACKAGE_DIR.iterdir() if folder.is_dir() and folder.name != "__pycache__"}
# A relative path to a .py or .md file, not the tail of a longer (absolute or dotted) one.
REFERENCE = re.compile(r"(?<![\w/.~-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md))\b")


def _prose(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                yield node.body[0].lineno, docstring


def _target(reference: str) -> Path | None:
    """The file ``reference`` names, or None when it is not a path into this repository."""
    top = reference.split("/", 1)[0]
    if top in FROM_REPO:
        return REPO / reference
    if top in FROM_PACKAGE:
        return PACKAGE_DIR / reference
    return None


def _references() -> Iterator[tuple[str, Path]]:
    for top in SCANNED:
        for module in sorted((REPO / top).rglob("*.py")):
            for line, text in _prose(module.read_text()):
                for reference in REFERENCE.findall(text):
                    target = _target(reference)
                    if target is not None:
                        yield f"{module.relative_to(REPO)}:{line}: {reference}", target


def test_the_scan_finds_references():
    """Guards the check itself: a pattern matching nothing would pass with every reference stale."""
    found = [where for where, _ in _references()]
    assert any(where.endswith(" docs/errors.md") for where in found)
    assert any(where.endswith(" hosts/ray_node.py") for where in found)


def test_every_file_named_in_a_comment_or_docstring_exists():
    assert [where for where, target in _references() if not target.is_file()] == []

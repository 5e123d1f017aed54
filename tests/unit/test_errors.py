"""One error registry: every code the package raises is in ``errors.ERRORS`` with one class, every
raise agrees with that class, and docs/errors.md is the registry's table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import machinen_async
from machinen_async import errors
from machinen_async.errors import ERRORS, MachinenError, error_from_code

PACKAGE = Path(machinen_async.__file__).parent
REGISTERED = {code: row.cls for row in ERRORS for code in row.codes}
ERROR_CLASSES = {
    name: value for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, MachinenError)
}
# Upper-case strings of a code's shape that are not codes.
NOT_CODES = {"IMAGE_CMD"}
CODE_PREFIXES = {code.split("_")[0] for code in REGISTERED} - {"MACHINEN"}  # MACHINEN_*: environment variables
CODE_SHAPE = re.compile(rf"^({'|'.join(sorted(CODE_PREFIXES))})_[A-Z0-9_]+$")


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text())) for path in sorted(PACKAGE.rglob("*.py"))]


def _code_literals() -> list[tuple[str, str]]:
    """(where, code) for every string of a code's shape and every ``code=`` literal."""
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and CODE_SHAPE.match(node.value):
                found.append((where, node.value))
            elif isinstance(node, ast.keyword) and node.arg == "code" and isinstance(node.value, ast.Constant):
                found.append((where, node.value.value))
    return [(where, code) for where, code in found if code not in NOT_CODES]


def test_every_code_in_the_package_is_registered_and_every_registered_code_is_used():
    literals = _code_literals()
    unregistered = sorted({f"{code} ({where})" for where, code in literals if code not in REGISTERED})
    assert unregistered == []
    used = {code for _, code in literals} | {cls.default_code for cls in ERROR_CLASSES.values()}
    assert sorted(set(REGISTERED) - used) == []


def test_every_raise_names_the_class_of_its_code_or_an_ancestor():
    """``SomeError(..., code="X")``: X's class is SomeError or one of its subclasses (which is what
    the error then is); a class's default code is its own."""
    wrong = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            cls = ERROR_CLASSES.get(node.func.id)
            code = next((k.value.value for k in node.keywords if k.arg == "code" and isinstance(k.value, ast.Constant)),
                        None)  # fmt: skip
            if cls is not None and code is not None and not issubclass(REGISTERED[code], cls):
                wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {cls.__name__} with {code} "
                             f"(a {REGISTERED[code].__name__})")  # fmt: skip
    assert wrong == []
    for cls in ERROR_CLASSES.values():
        assert REGISTERED[cls.default_code] is cls, cls


@pytest.mark.parametrize("code", sorted(REGISTERED))
def test_an_error_is_of_its_codes_class_however_it_was_made(code):
    cls = REGISTERED[code]
    for made in (MachinenError("m", code=code), error_from_code(code, "m"), cls("m", code=code)):
        assert type(made) is cls and made.code == code and str(made) == f"[{code}] m"
    for ancestor in cls.__mro__:
        if issubclass(ancestor, MachinenError):
            assert type(ancestor("m", code=code)) is cls


def test_an_unknown_code_keeps_its_code_in_the_class_asked_for():
    made = error_from_code("SOMETHING_NEW", "m", unknown=errors.ExecError)
    assert type(made) is errors.ExecError and made.code == "SOMETHING_NEW"


def test_the_errors_page_is_the_registry():
    page = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
    assert page.read_text() == errors.errors_markdown(), "run `make docs`"

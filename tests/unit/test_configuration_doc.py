"""docs/configuration.md lists every environment variable the package reads, and no other."""

from __future__ import annotations

import ast
import re

from machinen_async.store.assets import PACKAGE_DIR

PAGE = PACKAGE_DIR.parent / "docs" / "configuration.md"
# Read, but configure nothing of machinen's: the programs it runs are looked up on PATH (and
# sbin folders) as anywhere.
NOT_CONFIGURATION = {"PATH"}
# Documented, but read through the standard library rather than by name: Path.home() and "~".
READ_INDIRECTLY = {"HOME"}


def _is_os(node: ast.expr, attribute: str) -> bool:
    """Whether ``node`` is ``os.<attribute>``."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr == attribute
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _name_read(node: ast.AST) -> str | None:
    """The variable ``node`` reads by a literal name: ``os.environ.get/setdefault/pop("X")``,
    ``os.getenv("X")``, ``os.environ["X"]``, ``"X" in os.environ``."""
    if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
        function = node.func
        on_environ = _is_os(function.value, "environ") and function.attr in {"get", "setdefault", "pop"}
        return _literal(node.args[0]) if on_environ or _is_os(function, "getenv") else None
    if isinstance(node, ast.Subscript) and _is_os(node.value, "environ"):
        return _literal(node.slice)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.In | ast.NotIn):
        return _literal(node.left) if _is_os(node.comparators[0], "environ") else None
    return None


def _read_by_the_package() -> set[str]:
    return {
        name
        for module in PACKAGE_DIR.rglob("*.py")
        for node in ast.walk(ast.parse(module.read_text()))
        if (name := _name_read(node)) is not None
    }


def _documented() -> set[str]:
    """The first column of the page's tables."""
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", PAGE.read_text(), flags=re.MULTILINE))


def test_the_scan_finds_what_the_package_reads():
    """Guards the check itself: a scan finding nothing would pass with nothing documented."""
    assert {"MACHINEN_HOME", "XDG_RUNTIME_DIR", "DOCKER_CONFIG", "RAY_USE_TLS"} <= _read_by_the_package()


def test_every_variable_the_package_reads_is_documented():
    assert _read_by_the_package() - NOT_CONFIGURATION - _documented() == set()


def test_every_documented_variable_is_read():
    assert _documented() - _read_by_the_package() - READ_INDIRECTLY == set()

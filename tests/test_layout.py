"""The package's structure, checked from its imports (docs/architecture.md describes it)."""

from __future__ import annotations

from pathlib import Path

from machinen_async.store.assets import GUEST_PACKAGE, PACKAGE_DIR, package_imports

GUEST = PACKAGE_DIR / GUEST_PACKAGE
PROTOCOL = PACKAGE_DIR / "protocol"


def _modules() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def _name(module: Path) -> str:
    return module.relative_to(PACKAGE_DIR).as_posix()


def test_no_host_module_imports_the_guest():
    """The guest runs untrusted code: host processes must not run (or depend on) its modules."""
    offenders = {
        _name(module): sorted(_name(imported) for imported in package_imports(module) if GUEST in imported.parents)
        for module in _modules()
        if GUEST not in module.parents
    }
    assert {module: found for module, found in offenders.items() if found} == {}


def test_the_guest_imports_only_the_protocol():
    """What the guest needs from the package is what gets copied into the image beside it."""
    offenders = {
        _name(module): sorted(
            _name(imported)
            for imported in package_imports(module)
            if GUEST not in imported.parents and PROTOCOL not in imported.parents
        )
        for module in _modules()
        if GUEST in module.parents
    }
    assert {module: found for module, found in offenders.items() if found} == {}

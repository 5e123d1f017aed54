"""The package's structure, checked from its imports (docs/architecture.md describes it)."""

from __future__ import annotations

from pathlib import Path

from machinen_async.store.assets import GUEST_PACKAGE, PACKAGE_DIR, package_imports

GUEST = PACKAGE_DIR / GUEST_PACKAGE
PROTOCOL = PACKAGE_DIR / "protocol"
SUPERVISOR = PACKAGE_DIR / "supervisor"


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


def test_the_supervisor_sits_above_the_vmm_and_the_store_and_below_the_sdk():
    """A supervisor process must not need the SDK, CLI or remote code; nothing below it needs it."""
    below = [PACKAGE_DIR / "vmm", PACKAGE_DIR / "store", PROTOCOL]

    def allowed(imported: Path) -> bool:
        return imported == PACKAGE_DIR / "errors.py" or any(d in imported.parents for d in [*below, SUPERVISOR])

    upward = {
        _name(module): sorted(_name(imported) for imported in package_imports(module) if not allowed(imported))
        for module in _modules()
        if SUPERVISOR in module.parents
    }
    assert {module: found for module, found in upward.items() if found} == {}
    downward = {
        _name(module): sorted(_name(imported) for imported in package_imports(module) if SUPERVISOR in imported.parents)
        for module in _modules()
        if any(d in module.parents for d in below)
    }
    assert {module: found for module, found in downward.items() if found} == {}

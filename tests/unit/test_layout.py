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


# Bottom to top: a module may import its own layer and the ones below it, never above.
LAYERS = (
    {"errors.py", "version.py", "protocol"},
    {"store", "vmm"},
    {"supervisor"},
    {"hosts"},
    {"sdk"},
    {"cli.py", "mcp_server.py", "__init__.py", "__main__.py"},
)


def _layer(module: Path) -> int:
    top = module.relative_to(PACKAGE_DIR).parts[0]
    for rank, members in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{_name(module)} is in no layer: add its folder to LAYERS (and to docs/architecture.md)")


def _host_modules() -> list[Path]:
    return [module for module in _modules() if GUEST not in module.parents]


def test_imports_only_go_downward():
    offenders = {
        _name(module): sorted(
            _name(imported)
            for imported in package_imports(module)
            if GUEST not in imported.parents and _layer(imported) > _layer(module)
        )
        for module in _host_modules()
    }
    assert {module: found for module, found in offenders.items() if found} == {}


def test_no_import_loops():
    """Any import counts, also one inside a function: a loop there is still two modules that need each other."""
    graph = {module: package_imports(module) - {module} for module in _modules()}
    loops = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for imported in graph.get(module, ()):
                if imported == start:
                    loops.append(" -> ".join(_name(m) for m in [*path, start]))
                elif imported not in seen:
                    seen.add(imported)
                    stack.append((imported, [*path, imported]))
    assert sorted(set(loops)) == []


def test_only_the_qemu_backend_names_qemu():
    """A second VMM backend must need nothing but its folder: nothing outside vmm/qemu/ imports it."""
    qemu = PACKAGE_DIR / "vmm" / "qemu"
    offenders = {
        _name(module): sorted(_name(imported) for imported in package_imports(module) if qemu in imported.parents)
        for module in _host_modules()
        if qemu not in module.parents
    }
    assert {module: found for module, found in offenders.items() if found} == {}

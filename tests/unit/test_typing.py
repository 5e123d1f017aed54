"""The public API as type checkers see it: ``from machinen_async import boot`` is typed (a
``py.typed`` package, names imported for checkers), the overloads give ``VM`` or ``Forks``, every
public symbol's type is known (pyright's ``--verifytypes``), no public signature says ``Any``, and
the examples pass ``mypy --strict``."""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import machinen_async
from machinen_async.sdk.host import BootOptions, PoolBootOptions, boot

pytest.importorskip("mypy")

PACKAGE = Path(machinen_async.__file__).parent
EXAMPLES = PACKAGE.parent / "examples"
# Where users' code meets the package: what ``machinen_async`` exports and what it returns.
PUBLIC_MODULES = ["__init__.py", "errors.py", "sdk/*.py", "hosts/base.py", "protocol/messages.py"]


def mypy_strict(*paths: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir", str(cache), *map(str, paths)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_the_package_says_it_is_typed():
    assert (PACKAGE / "py.typed").is_file()


def test_what_a_checker_infers_of_boot_fork_and_restore(tmp_path: Path):
    checked = mypy_strict(Path(__file__).resolve().parents[1] / "type_checks" / "usage.py", cache=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("example", sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.py")))
def test_the_examples_pass_mypy_strict(example: str, tmp_path: Path):
    checked = mypy_strict(EXAMPLES / example, cache=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_boot_options_others_pass_on_are_boots_own():
    """``Host.boot``, ``RayHosts.boot`` and ``warm_pool`` take ``**BootOptions``: exactly ``boot()``'s keywords."""
    keywords = {p.name for p in inspect.signature(boot).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert set(BootOptions.__annotations__) | set(PoolBootOptions.__annotations__) == keywords - {"host"}
    # A pool's VMs wait before they are taken: a lifetime counted from their boot is not one a pool passes on.
    not_pooled = {"host", "name", "memory_mib", "warm", "ttl", "idle_timeout", "on_idle", "secrets"}
    assert keywords - set(PoolBootOptions.__annotations__) == not_pooled


def _public_annotations(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, annotation) of every parameter, return and field a user of this module sees."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, public: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, public and not child.name.startswith("_"))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                dunder = child.name.startswith("__") and child.name.endswith("__")
                if public and (dunder or not child.name.startswith("_")):
                    arguments = child.args
                    every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                             arguments.vararg, arguments.kwarg]  # fmt: skip
                    annotations = [a.annotation for a in every if a is not None] + [child.returns]
                    found.extend((a.lineno, ast.unparse(a)) for a in annotations if a is not None)
            elif isinstance(child, ast.AnnAssign) and public and isinstance(child.target, ast.Name):
                if not child.target.id.startswith("_"):
                    found.append((child.lineno, ast.unparse(child.annotation)))

    visit(tree, True)
    return found


def test_no_public_signature_says_any():
    """``Any`` switches the checker off for the caller: the public surface names real types."""
    offenders = [
        f"{module.relative_to(PACKAGE)}:{line}: {annotation}"
        for pattern in PUBLIC_MODULES
        for module in sorted(PACKAGE.glob(pattern))
        for line, annotation in _public_annotations(ast.parse(module.read_text()))
        if any(isinstance(n, ast.Name) and n.id == "Any" for n in ast.walk(ast.parse(annotation, mode="eval")))
    ]
    assert offenders == []


@pytest.mark.skipif(
    shutil.which("basedpyright", path=os.path.dirname(sys.executable)) is None, reason="no basedpyright"
)
def test_pyright_knows_the_type_of_every_public_symbol(tmp_path: Path):
    """pyright's ``--verifytypes`` (as trio's test_exports runs it): 100 % of the symbols a user can
    reach have known types."""
    (tmp_path / "pyrightconfig.json").write_text("{}")  # not the project's settings: the package as installed
    checked = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "basedpyright"), "--pythonpath", sys.executable,
         "--verifytypes", "machinen_async", "--ignoreexternal", "--outputjson"],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
        # The interpreter's bin first: pyright finds the packages it imports (anyio...) through it.
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent),
             "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])},
    )  # fmt: skip
    report = json.loads(checked.stdout)["typeCompleteness"]
    unknown = [s["name"] for s in report["symbols"] if s["isExported"] and not s["isTypeKnown"]]
    assert report["packageRootDirectory"] == str(PACKAGE)
    assert unknown == [], f"{report['completenessScore']:.1%} typed"

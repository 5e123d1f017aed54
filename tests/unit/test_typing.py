"""The public API as type checkers see it: ``from machinen_async import boot`` is typed (a
``py.typed`` package, names imported for checkers), and the overloads give ``VM`` or ``Forks``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import machinen_async

pytest.importorskip("mypy")


def test_the_package_says_it_is_typed():
    assert (Path(machinen_async.__file__).parent / "py.typed").is_file()


def test_what_a_checker_infers_of_boot_fork_and_restore():
    usage = Path(__file__).resolve().parents[1] / "type_checks" / "usage.py"
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental", str(usage)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr

"""The CLI against what documents it, with no VM: every command line of the seed README parses,
and docs/cli.md is generated from the click commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from machinen_async.cli import cli_markdown, main

REPO = Path(__file__).resolve().parents[2]
SEED_README = REPO.parent / "shared" / "seed" / "machinen-README.md"


def _seed_command_lines() -> list[list[str]]:
    """Every ``npx machinen ...`` / ``npx mn ...`` line of the seed README's shell blocks, as argv."""
    lines: list[list[str]] = []
    in_shell = False
    for line in SEED_README.read_text().splitlines():
        if line.startswith("```"):
            in_shell = line.strip() in ("```bash", "```sh")
            continue
        found = re.search(r"npx (?:machinen|mn) (.*)", line) if in_shell else None
        if found:
            command = re.split(r"\s(?:#|&)", found[1])[0]
            lines.append(shlex.split(command.replace("<tag>", "v0")))
    return lines


@pytest.mark.skipif(not SEED_README.is_file(), reason="../shared/seed is beside the checkout in CI")
def test_every_command_line_of_the_seed_readme_parses():
    """CLI parity with machinen: what its README types, ours accepts (parsed, not run)."""
    commands = _seed_command_lines()
    assert len(commands) >= 14  # boot, snapshot, restore, fork, exec, install as the seed types them
    root = click.Context(main, info_name="machinen", **main.context_settings)  # as `machinen` makes it
    for name, *rest in commands:
        command = main.get_command(root, name)
        assert command is not None, name
        try:
            command.make_context(name, rest, parent=root)
        except click.ClickException as refused:
            raise AssertionError(f"{[name, *rest]}: {refused.format_message()}") from None


def test_the_cli_page_is_the_cli():
    page = REPO / "docs" / "cli.md"
    assert page.read_text() == cli_markdown(), "run `make docs`"

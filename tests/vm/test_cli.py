"""The CLI, run as separate processes against the shared detached VM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARED_VM, ls_json, qemu_of, qemu_processes, runtime_leftovers
from llm_stub import MODEL as STUB_MODEL
from llm_stub import StubServer

from machinen_async.protocol.messages import VMMetrics


def test_exec_streams_and_returns_guest_exit_code(shared_vm, cli):
    result = cli("exec", shared_vm, "--", "sh", "-c", "cat; echo to-err >&2; exit 7", check=False, input=b"from-host\n")
    assert result.returncode == 7
    assert result.stdout == b"from-host\n"
    assert result.stderr == b"to-err\n"


def test_exec_errors_are_typed(shared_vm, cli):
    missing = cli("exec", shared_vm, "--", "/no/such/binary", check=False, stdin=subprocess.DEVNULL)
    assert missing.returncode == 1
    assert b"error [EXEC_COMMAND_NOT_FOUND]" in missing.stderr
    unknown = cli("exec", "no-such-vm", "--", "true", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith(b"error [REGISTRY_VM_NOT_FOUND]")


def test_ls_json_shape(shared_vm):
    rows = {row["name"]: row for row in ls_json()}
    row = rows[SHARED_VM]
    assert set(row) == {
        "name", "pid", "qemu_pid", "accel", "memory_mib", "uptime_s", "image", "image_source", "start", "detached",
        "forked_from", "ports", "deadline", "lineage", "restored_from", "metrics",
    }  # fmt: skip
    assert row["deadline"] is None and row["lineage"] == [] and row["restored_from"] is None  # booted, no ttl
    metrics = row["metrics"]  # asked of its supervisor: a running QEMU's figures
    assert set(metrics) == set(VMMetrics.__annotations__) and metrics["qemu_rss_bytes"] > 0 and metrics["cpu_s"] > 0
    assert row["detached"] is True and row["memory_mib"] == 256 and row["accel"] in ("kvm", "tcg")
    assert isinstance(row["pid"], int) and isinstance(row["uptime_s"], float)


def test_boot_detach_name_in_use(shared_vm, cli):
    again = cli("boot", "--name", SHARED_VM, "--detach", check=False)
    assert again.returncode == 1
    assert b"error [REGISTRY_NAME_IN_USE]" in again.stderr


def test_boot_run_command_then_stop(cli):
    result = cli("boot", "--name", "cli-oneshot", "--", "sh", "-c", "hostname; exit 4", check=False)
    assert result.returncode == 4, result.stderr
    assert result.stdout == b"cli-oneshot\n"
    assert "cli-oneshot" not in {row["name"] for row in ls_json()}


def test_detached_lifecycle_stop(cli):
    cli("boot", "--name", "cli-detached", "--detach")
    assert "cli-detached" in {row["name"] for row in ls_json()}
    stopped = cli("stop", "cli-detached", "--json")
    assert json.loads(stopped.stdout) == {"name": "cli-detached", "stopped": True, "how": "stopped"}
    assert "cli-detached" not in {row["name"] for row in ls_json()}
    assert cli("stop", "cli-detached", check=False).returncode == 1


def test_help_and_version(cli):
    assert b"Usage" in cli("--help").stdout
    assert b"machinen" in cli("--version").stdout


def test_fork_detached_siblings_count_independently(cli):
    cli("boot", "--name", "cli-counter", "--detach")
    try:
        cli("exec", "cli-counter", "--", "sh", "-c", "echo 2 > /root/count")
        forked = json.loads(
            cli("fork", "cli-counter", "--new-name", "cli-counter-b", "-n", "2", "--detach", "--json").stdout
        )
        assert [s["name"] for s in forked] == ["cli-counter-b-0", "cli-counter-b-1"]
        rows = {row["name"]: row for row in ls_json()}
        assert rows["cli-counter-b-0"]["forked_from"] == "cli-counter"
        bump = ["sh", "-c", "echo $(( $(cat /root/count) + 1 )) > /root/count; cat /root/count"]
        assert cli("exec", "cli-counter-b-0", "--", *bump, stdin=subprocess.DEVNULL).stdout == b"3\n"
        assert cli("exec", "cli-counter-b-0", "--", *bump, stdin=subprocess.DEVNULL).stdout == b"4\n"
        assert cli("exec", "cli-counter", "--", *bump, stdin=subprocess.DEVNULL).stdout == b"3\n"
        assert cli("exec", "cli-counter-b-1", "--", *bump, stdin=subprocess.DEVNULL).stdout == b"3\n"
    finally:
        for name in ("cli-counter-b-0", "cli-counter-b-1", "cli-counter"):
            cli("stop", name, check=False)


def test_snapshot_restore_and_gc(shared_vm, cli, tmp_path):
    bundle = tmp_path / "cli.snap"
    cli("exec", shared_vm, "--", "sh", "-c", "echo from-shared > /root/marker", stdin=subprocess.DEVNULL)
    taken = json.loads(cli("snapshot", shared_vm, str(bundle), "--json").stdout)
    assert taken["bundle"] == str(bundle) and taken["pause_ms"] > 0
    restored = json.loads(cli("restore", str(bundle), "--name", "cli-restored", "--detach", "--json").stdout)
    try:
        assert restored["name"] == "cli-restored"
        marker = cli("exec", "cli-restored", "--", "cat", "/root/marker", stdin=subprocess.DEVNULL)
        assert marker.stdout == b"from-shared\n"
        listed = json.loads(cli("gc", "--dry-run", "--json").stdout)
        assert listed["dry_run"] is True
        assert not [p for p in listed["removed"] if "/vms/" in p], "gc would touch a live VM"
    finally:
        cli("stop", "cli-restored", check=False)
    missing = cli("restore", str(tmp_path / "none"), check=False)
    assert missing.returncode == 1 and b"error [BOOT_SNAPSHOT_NOT_FOUND]" in missing.stderr


def test_gc_clears_what_a_killed_vm_left(cli):
    cli("boot", "--name", "cli-killed", "--detach")
    row = {r["name"]: r for r in ls_json()}["cli-killed"]
    os.kill(row["pid"], signal.SIGKILL)  # QEMU follows through its parent-death signal
    deadline = time.monotonic() + 20
    while "cli-killed" in {r["name"] for r in ls_json()} or any("cli-killed" in p for p in qemu_processes()):
        assert time.monotonic() < deadline, "killed VM still listed"
        time.sleep(0.1)
    removed = json.loads(cli("gc", "--json").stdout)["removed"]
    assert any(p.endswith("/vms/cli-killed") for p in removed)
    assert any("/layers/" in p for p in removed)
    assert not [d for d in runtime_leftovers() if d.startswith("cli-killed-")]
    assert json.loads(cli("gc", "--json").stdout)["removed"] == []


def test_stop_force_and_aliases(cli):
    cli("boot", "--name", "cli-force", "--detach")
    assert "cli-force" in {row["name"] for row in json.loads(cli("ps", "--json").stdout)}
    assert b"cli-force" in cli("list").stdout
    stopped = cli("stop", "cli-force", "--force", "--json")
    assert json.loads(stopped.stdout) == {"name": "cli-force", "stopped": True, "how": "killed"}
    assert not qemu_of("cli-force")
    assert not [d for d in runtime_leftovers() if d.startswith("cli-force-")]


def test_sigterm_and_sigint_exit_codes(cli):
    for signum, expected in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "machinen_async", "boot", "--name", f"cli-signal-{signum}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while f"cli-signal-{signum}" not in {row["name"] for row in ls_json()}:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == expected
        assert f"cli-signal-{signum}" not in {row["name"] for row in ls_json()}


def test_shell_completion(cli):
    assert b"_MACHINEN_COMPLETE" in cli("completion", "bash").stdout
    env = {**os.environ, "_MACHINEN_COMPLETE": "bash_complete", "COMP_WORDS": "machinen sn", "COMP_CWORD": "1"}
    assert b"snapshot" in cli(env=env).stdout


FORK_PI = str(Path(__file__).resolve().parents[2] / "examples" / "fork_pi" / "run.py")
FORK_PI_PROMPTS = ["what is pi", "hash the word fork", "summarise why copy-on-write siblings are cheap"]


def test_fork_pi_example():
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}  # offline mode, whatever the CI has
    result = subprocess.run(
        [sys.executable, FORK_PI], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mode: offline scripted agent" in result.stdout
    assert "pi to 60 places is 3.14159265358979323846264338327950288419716939937510582097494" in result.stdout
    assert "3 siblings forked and answered" in result.stdout


@pytest.mark.timeout(1800)
def test_fork_pi_example_runs_the_pi_agent():
    """pi mode for real: the trixie image with pi from npm, one pi process per sibling.

    No LLM API is reachable from here, so pi talks to an OpenAI-compatible
    stand-in on this host; everything else (VM, agent, pi, its HTTP calls) is real.
    """
    with StubServer() as llm:
        result = subprocess.run(
            [sys.executable, FORK_PI, "--openai-base-url", f"http://10.0.2.2:{llm.port}/v1", "--model", STUB_MODEL],
            capture_output=True, text=True, timeout=1700, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "mode: pi coding agent 0.73.1 (OpenAI-compatible server" in result.stdout
    assert "pi --version: 0.73.1" in result.stdout
    for prompt in FORK_PI_PROMPTS:
        assert f"A: stub answer to: {prompt}" in result.stdout
    assert len(llm.prompts) == len(FORK_PI_PROMPTS)  # one model call per sibling


def test_install_pins_only_its_own_version(cli):
    from machinen_async import __version__

    refused = cli("install", "--version", "v0.0.0-other", check=False)
    assert refused.returncode == 1 and b"error [PARSE_FLAG_INVALID]" in refused.stderr
    assert __version__.encode() in refused.stderr


TREE_SEARCH = str(Path(__file__).resolve().parents[2] / "examples" / "tree_search" / "run.py")


def test_tree_search_example():
    """Levels of siblings, each forked from the best of the level before; the winner's lineage is
    the path of VMs from the root, and the sequential run in one VM made the same moves."""
    result = subprocess.run([sys.executable, TREE_SEARCH], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["levels"] >= 2 and report["moves"] >= 20  # a fork of a fork at least; 31 moves at best
    assert "tree-root" in result.stdout and "solved it" in result.stdout

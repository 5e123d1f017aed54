"""Pseudo-terminals: SDK tty processes, `machinen exec --tty` and `machinen attach` driven through a host pty."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from machinen_async import connect


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def read_until(master: int, marker: bytes, timeout: float = 30) -> bytes:
    """Read the terminal until ``marker``; commands print computed markers ($((1))) so
    the terminal's echo of the typed line never matches."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} in {seen[-500:]!r}"
        if select.select([master], [], [], remaining)[0]:
            try:
                seen += os.read(master, 65536)
            except OSError:  # the other side closed
                break
    return seen


@pytest.mark.anyio
async def test_tty_process_has_a_terminal_and_follows_resizes(shared_vm):
    async with connect(shared_vm) as vm:
        async with vm.process(["sh"], tty=True, size=(33, 77)) as shell:
            await shell.stdin.send(b"tty; stty size; echo mark-$((1))\n")
            out = b""
            while b"mark-1\r\n" not in out:
                out += await shell.stdout.receive()
            assert b"/dev/pts/" in out and b"33 77" in out
            await shell.resize(50, 132)
            await shell.stdin.send(b"stty size; exit 4\n")
            async for chunk in shell.stdout:
                out += chunk
            assert b"50 132" in out
            assert await shell.wait() == 4


def run_cli_on_pty(*args: str) -> tuple[subprocess.Popen, int]:
    master, slave = pty.openpty()
    set_size(slave, 30, 100)
    proc = subprocess.Popen([sys.executable, "-m", "machinen_async", *args], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    return proc, master


def test_cli_exec_tty_and_resize(shared_vm):
    proc, master = run_cli_on_pty("exec", "--tty", shared_vm, "--", "sh")
    try:
        os.write(master, b"tty; stty size; echo mark-$((1))\r")
        out = read_until(master, b"mark-1\r\n")
        assert b"/dev/pts/" in out and b"30 100" in out
        set_size(master, 45, 120)
        proc.send_signal(signal.SIGWINCH)
        time.sleep(1)
        os.write(master, b"stty size; echo mark-$((2))\r")
        assert b"45 120" in read_until(master, b"mark-2\r\n")
        os.write(master, b"exit 5\r")
        assert proc.wait(timeout=30) == 5
    finally:
        proc.kill()
        os.close(master)


def test_cli_attach_opens_a_login_shell(shared_vm):
    proc, master = run_cli_on_pty("attach", shared_vm)
    try:
        os.write(master, b"echo shell=$0 cwd=$PWD; shopt -q login_shell && echo login-$((1)); exit 3\r")
        out = read_until(master, b"login-1\r\n")
        assert b"shell=/bin/bash cwd=/root\r\n" in out
        assert proc.wait(timeout=30) == 3
    finally:
        proc.kill()
        os.close(master)


def test_cli_boot_runs_a_foreground_command_on_a_tty():
    proc, master = run_cli_on_pty("boot", "--name", "tty-boot", "--tty", "--", "sh")
    try:
        os.write(master, b"tty; exit 6\r")
        assert b"/dev/pts/" in read_until(master, b"/dev/pts/", timeout=120)
        assert proc.wait(timeout=60) == 6
    finally:
        proc.kill()
        os.close(master)

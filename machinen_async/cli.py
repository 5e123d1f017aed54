"""``machinen`` command line (also ``python -m machinen_async``).

Exit codes: the guest command's for ``exec``/``boot -- cmd``; otherwise 0
success, 1 error (``error [CODE]: message`` on stderr), 130 on SIGINT, 143
on SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import stat
import sys
import termios
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import anyio
import click

from . import __version__
from .errors import BootError, GuestFileError, MachinenError, plain_errors
from .protocol.guest_abi import WORKLOAD_LOG
from .protocol.messages import VMMetrics, VMRow, seconds_left
from .sdk.boot import IMAGE_CMD, boot, connect, restore, stop_vm
from .sdk.mounts import Mount
from .sdk.network import NetworkPolicy, Secret
from .sdk.vm import VM
from .store import assets, layers, oci_image, oci_pull, registry

EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def _run(main: Callable[[], Awaitable[int | None]]) -> None:
    """Run ``main`` on asyncio, mapping errors and signals to exit codes."""

    async def wrapper() -> int:
        async with anyio.create_task_group() as tg:
            outcome: list[int] = []

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                    async for signum in received:
                        outcome.append(EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)
                        tg.cancel_scope.cancel()

            async def body() -> None:
                try:
                    with plain_errors():
                        outcome.append(await main() or 0)
                except MachinenError as exc:
                    click.echo(f"error [{exc.code}]: {terminal_safe(exc.message)}", err=True)
                    outcome.append(1)
                tg.cancel_scope.cancel()

            tg.start_soon(on_signals)
            tg.start_soon(body)
        return outcome[0] if outcome else 1

    sys.exit(anyio.run(wrapper))


# C0 and C1 control characters but newline and tab: a guest's text (its console, its stderr in an
# error message) must not drive the terminal (move the cursor, retitle the window, paste...).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` with control characters shown as escapes (``\x1b``) instead of acted on."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _cell(value: Any) -> str:
    """A table cell from a value a peer (or a VM's meta) sent, whatever its shape: on one line,
    control characters escaped (newlines and tabs too: they would forge rows), "-" when empty."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    try:
        if isinstance(value, list | tuple):
            text = ",".join(item if isinstance(item, str) else repr(item) for item in value)
        else:
            text = value if isinstance(value, str) else repr(value)
    except (RecursionError, ValueError):  # nested too deep to show
        text = f"<{type(value).__name__}>"
    return terminal_safe(text).replace("\n", "\\x0a").replace("\t", "\\x09")


def _progress(message: str) -> None:
    click.echo(f"machinen: {message}", err=True)


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    """Our terminal in raw mode (keys go to the guest as typed), restored on exit."""
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0, termios.TCSANOW)  # TCSAFLUSH (the default) would drop keys typed ahead
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSANOW, saved)


async def _stream_exec(
    vm: VM,
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    timeout: float | None,
    *,
    use_tty: bool = False,
    user: str | None = None,
) -> int:
    """Run argv in the VM with our stdio attached; returns its exit code.

    With ``use_tty`` the guest process gets a pseudo-terminal of our size,
    our terminal goes raw and window resizes follow it.
    """
    interactive = sys.stdin.isatty()
    forward_stdin = use_tty or not interactive
    size = os.get_terminal_size(0) if use_tty and interactive else os.terminal_size((24, 80))
    if use_tty:
        env = {"TERM": os.environ.get("TERM", "xterm"), **env}
    async with vm.process(
        argv,
        env=env,
        cwd=cwd,
        stdin=forward_stdin,
        timeout=timeout,
        tty=use_tty,
        size=(size.lines, size.columns),
        user=user,
    ) as proc:

        async def copy_out(stream, fd: int) -> None:
            async for chunk in stream:
                await anyio.to_thread.run_sync(_write_all, fd, chunk)

        async def copy_in() -> None:
            while chunk := await _read_stdin():
                await proc.stdin.send(chunk)
            await proc.stdin.aclose()

        async def follow_resizes() -> None:
            with anyio.open_signal_receiver(signal.SIGWINCH) as resizes:
                async for _ in resizes:
                    size = os.get_terminal_size(0)
                    await proc.resize(size.lines, size.columns)

        with _raw_terminal(use_tty and interactive):
            async with anyio.create_task_group() as tg:
                if forward_stdin:
                    tg.start_soon(copy_in)
                if use_tty and interactive:
                    tg.start_soon(follow_resizes)
                async with anyio.create_task_group() as output:
                    output.start_soon(copy_out, proc.stdout, 1)
                    output.start_soon(copy_out, proc.stderr, 2)
                code = await proc.wait()
                tg.cancel_scope.cancel()  # the command is done; stop reading our stdin
        if proc.timed_out:
            click.echo(f"error [EXEC_AGENT_TIMEOUT]: {argv!r} timed out after {timeout:g} s", err=True)
        return code


async def _read_stdin() -> bytes:
    """A chunk of our stdin, b"" at its end.  Waits in the event loop rather
    than in a thread, which would keep the process alive after the command
    ended (a blocked read cannot be interrupted)."""
    mode = os.fstat(0).st_mode
    # Pipes, sockets and terminals can block; files and /dev/null cannot (and epoll refuses them).
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(0):
        await anyio.wait_readable(0)
    return os.read(0, 65536)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _command(cmd: tuple[str, ...]) -> list[str]:
    """The words after ``--`` (click keeps the separator when interspersed args are off)."""
    words = list(cmd)
    return words[1:] if words[:1] == ["--"] else words


@contextlib.asynccontextmanager
async def _connect_address(address: str) -> AsyncIterator[VM]:
    """VM ``name`` here, or ``host:name`` on a host reached over SSH."""
    host, name = _split_address(address)
    if host is None:
        async with connect(name) as vm:
            yield vm
        return
    async with host, host.connect(name) as vm:
        yield vm


def _split_address(address: str) -> tuple[Any, str]:
    """(SSH host or None, VM name); asyncssh is imported only for a ``host:name``."""
    if ":" not in address:
        return None, address
    from .sdk.host import split_vm_address

    return split_vm_address(address)


def _ssh_host(spec: str) -> Any:
    from .sdk.host import Host

    return Host.from_spec(spec)


def _split_image_and_command(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """``[IMAGE] [--] CMD...``: click drops a leading ``--``, so an image is recognised by its
    tarball suffix, an OCI source prefix, the ``--`` after it (``python:3.12-slim -- python3 -V``),
    or, alone, a tag or digest (``alpine:3.20``; a bare ``alpine`` would be a command)."""
    words = list(args)
    is_image = words and (words[0].endswith(oci_image.TARBALL_SUFFIXES) or words[0].startswith(oci_pull.LOCAL_PREFIXES)
                          or words[1:2] == ["--"] or (len(words) == 1 and ":" in words[0]))  # fmt: skip
    image = words.pop(0) if is_image else None
    return image, _command(tuple(words))


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MachinenError(f"--env takes KEY=VALUE, got {pair!r}", code="PARSE_FLAG_INVALID")
        env[key] = value
    return env


CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])


class OptionDecorator(Protocol):
    """What ``click.option`` returns: adds its option to a command function, kept as it is."""

    def __call__(self, command: CommandFunction, /) -> CommandFunction: ...


network_options: list[OptionDecorator] = [
    click.option("--allow", "allow_rules", multiple=True, metavar="NAME|ADDR[/PREFIX][:PORT]",
                 help="Let the guest reach a destination: an address the policy closes, or a name "
                      "(api.example.com, *.example.com; any name makes the policy an allow list); repeatable."),
    click.option("--allow-host", "allow_host_ports", multiple=True, type=int, metavar="PORT",
                 help="Let the guest reach this host's loopback service on PORT (as 10.0.2.2:PORT); repeatable."),
    click.option("--deny", "deny_rules", multiple=True, metavar="NAME|ADDR[/PREFIX][:PORT]",
                 help="Refuse a name (its DNS answers NXDOMAIN) or an address; wins over --allow; repeatable."),
    click.option("--network-closed/--network-open", "network_closed", default=None,
                 help="Nothing reachable but what --allow names (a restore's default), or outbound open "
                      "with the host closed (a boot's)."),
]  # fmt: skip


def network_option(command: CommandFunction) -> CommandFunction:
    for option in reversed(network_options):
        command = option(command)
    return command


def _network_policy(
    allow_rules: tuple[str, ...], allow_host_ports: tuple[int, ...], deny_rules: tuple[str, ...], closed: bool | None
) -> NetworkPolicy | None:
    """The policy the flags give, or None without any (the command's default)."""
    if not (allow_rules or allow_host_ports or deny_rules or closed is not None):
        return None
    allow = (*(f"127.0.0.1:{port}" for port in allow_host_ports), *allow_rules)
    return NetworkPolicy(allow=allow, deny=deny_rules, default_deny=bool(closed))


secret_option: OptionDecorator = click.option(
    "--secret", "secret_specs", multiple=True, metavar="NAME=ENVVAR@HOST[,HOST...]",
    help="The guest's $NAME is a placeholder; HTTPS requests to HOST get this machine's $ENVVAR in its "
         "place (headers only); repeatable.",
)  # fmt: skip


def _secrets(specs: tuple[str, ...]) -> dict[str, Secret] | None:
    """``NAME=ENVVAR@HOST[,HOST...]`` each: the value read from this process's environment."""
    secrets = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        variable, _, hosts = rest.partition("@")
        if not (name and variable and hosts):
            raise BootError(f"--secret is NAME=ENVVAR@HOST[,HOST...], not {spec!r:.100}", code="BOOT_SECRET_INVALID")
        if variable not in os.environ:
            raise BootError(f"--secret {name}: ${variable} is not set here", code="BOOT_SECRET_INVALID")
        secrets[name] = Secret(os.environ[variable], hosts=hosts.split(","))
    return secrets or None


def mount_option(copied: bool) -> OptionDecorator:
    """``--mount-live`` (and for boot ``--mount``): host directories in the guest."""

    def options(command: CommandFunction) -> CommandFunction:
        command = click.option(
            "--mount-live", "live_mounts", multiple=True, metavar="HOST:GUEST[:ro|rw]",
            help="A host directory live in the guest (both ways, kept by forks and restores); repeatable.",
        )(command)  # fmt: skip
        if copied:
            command = click.option(
                "--mount", "copied_mounts", multiple=True, metavar="HOST:GUEST[:ro|rw]",
                help="Copy a host directory into the guest at boot; repeatable.",
            )(command)  # fmt: skip
        return command

    return options


def _mounts(live: tuple[str, ...], copied: tuple[str, ...] = ()) -> list[Mount]:
    return [*(Mount.parse(spec, live=True) for spec in live), *(Mount.parse(spec) for spec in copied)]


ttl_option: OptionDecorator = click.option(
    "--ttl", type=float, default=None, metavar="SECONDS",
    help="Stop the VM this long after it starts, detached or not (`machinen ls` shows the time left).",
)  # fmt: skip
idle_timeout_option: OptionDecorator = click.option(
    "--idle-timeout", type=float, default=None, metavar="SECONDS",
    help="Stop the VM once it has had no call (exec, file, ...) in progress for this long.",
)  # fmt: skip
on_idle_option: OptionDecorator = click.option(
    "--on-idle", default=None, metavar="stop|snapshot:DIR",
    help="What --idle-timeout does: stop the VM (default), or first snapshot it into the bundle directory DIR "
    "(new or empty; `machinen restore DIR` continues it).  A failed snapshot is logged; the VM stops anyway.",
)  # fmt: skip
trust_option: OptionDecorator = click.option(
    "--trust", is_flag=True, help="Accept a bundle this user's machinen did not write (its device state reaches QEMU)."
)
publish_option: OptionDecorator = click.option(
    "-p",
    "--publish",
    "ports",
    multiple=True,
    metavar="[ADDR:]HOST:GUEST",
    help="Forward a host TCP port (on 127.0.0.1 unless ADDR) to a guest port; repeatable.",
)
insecure_option: OptionDecorator = click.option(
    "--insecure-registry",
    "insecure",
    multiple=True,
    metavar="HOST[:PORT]|CIDR",
    help="A registry reached over plain HTTP (loopback ones always are); repeatable.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="machinen")
def main() -> None:
    """Boot Linux microVMs, run commands in them, fork and snapshot them."""


@main.command()
@click.option("--refresh", is_flag=True, help="Ask apt again for the newest kernel/busybox/rootfs inputs.")
@click.option(
    "--version", "pinned", metavar="VERSION",
    help="Fail unless this machinen is VERSION (what it builds is this version's; pip pins another).",
)  # fmt: skip
def install(refresh: bool, pinned: str | None) -> None:
    """Fetch and build the base kernel, initramfs and root filesystem."""

    async def run() -> None:
        if pinned is not None and pinned.removeprefix("v") != __version__:
            wanted = pinned.removeprefix("v")
            raise MachinenError(
                f"this machinen is {__version__}, not {wanted}: `pip install machinen_async=={wanted}` installs "
                "that one (each version builds its own assets)",
                code="PARSE_FLAG_INVALID",
            )

        def build() -> Any:
            base = assets.ensure_base(_progress, refresh=refresh)
            return base, assets.image_for(base.rootfs_tarball, _progress)

        base, image = await anyio.to_thread.run_sync(build)
        click.echo(f"kernel  {base.kernel}  ({base.kernel_package})")
        click.echo(f"initrd  {base.initrd}")
        click.echo(f"rootfs  {base.rootfs_tarball}")
        click.echo(f"image   {image}")

    _run(run)


@main.command(name="boot", context_settings={"allow_interspersed_args": False})
@click.option("--name", help="VM name (default: generated).")
@click.option("--memory", "memory_mib", type=int, default=256, show_default=True, help="Guest RAM in MiB.")
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), help="Default: $MACHINEN_ACCEL or auto.")
@click.option("--boot-timeout", type=float, default=60.0, show_default=True)
@click.option("--env", "env_pairs", multiple=True, metavar="K=V", help="Environment for the command.")
@click.option(
    "--no-network", is_flag=True, help="Boot with no network device (default: outbound NAT, the host closed)."
)
@network_option
@click.option("--tty", "-t", "use_tty", is_flag=True, help="Run the foreground CMD on a pseudo-terminal.")
@publish_option
@mount_option(copied=True)
@click.option("--detach", "--detached", "-d", is_flag=True, help="Leave the VM running and return.")
@click.option("--run-image-cmd", is_flag=True, help="Run an OCI image's Entrypoint + Cmd as the VM's workload.")
@click.option("--cold", is_flag=True, help="Boot the kernel even if a boot template could be resumed.")
@ttl_option
@idle_timeout_option
@on_idle_option
@click.option(
    "--pull",
    type=click.Choice(["missing", "always", "never"]),
    default="missing",
    show_default=True,
    help="An OCI image: ask the registry only when it is not cached, always, or never.",
)
@insecure_option
@click.option(
    "--host", "host_spec", metavar="[USER@]HOST",
    help="Boot on HOST over SSH (its images, templates and ports; --mount copies from here).",
)  # fmt: skip
@secret_option
@click.option("--json", "as_json", is_flag=True, help="Print the VM's description as JSON.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[IMAGE] [-- CMD...]")
def boot_command(
    args, name, memory_mib, cpus, accel, boot_timeout, env_pairs, no_network, allow_rules, allow_host_ports, deny_rules,
    network_closed, use_tty, secret_specs,
    ports, live_mounts, copied_mounts, detach, run_image_cmd, cold, ttl, idle_timeout, on_idle, pull, insecure, host_spec,
    as_json,
) -> None:  # fmt: skip
    """Boot a VM from IMAGE: a rootfs tarball (.tar, .tar.gz, ...), an OCI / Docker image
    (python:3.12-slim, localhost:5000/team/agent@sha256:..., oci:DIR[:TAG], docker-archive:FILE;
    `machinen boot python:3.12-slim -- python3 -V`), or by default the base image.

    The image's default cmd (see `provision`) runs as the VM's workload.  With
    `-- CMD...` in the foreground, run CMD, stream its output and exit with its
    code (the VM is stopped after).  With --detach the VM keeps running and
    CMD, if given, is its workload (output: `machinen logs --workload`).
    """
    image, cmd = _split_image_and_command(args)
    env = _parse_env(env_pairs)

    async def run() -> int:
        async with contextlib.AsyncExitStack() as stack:
            host = None if host_spec is None else await stack.enter_async_context(_ssh_host(host_spec))
            launch = boot(
                image, name=name, memory_mib=memory_mib, cpus=cpus, accel=accel, boot_timeout=boot_timeout,
                detached=detach, ports=ports, progress=_progress, pull=pull, insecure=insecure, warm=not cold,
                network=False if no_network else _network_policy(allow_rules, allow_host_ports, deny_rules,
                                                                 network_closed) or NetworkPolicy(),
                cmd=IMAGE_CMD if run_image_cmd else cmd if detach and cmd else None, env=env,
                mounts=_mounts(live_mounts, copied_mounts), host=host, ttl=ttl,
                idle_timeout=idle_timeout, on_idle=on_idle, secrets=_secrets(secret_specs),
            )  # fmt: skip
            vm = await stack.enter_async_context(launch)
            address = vm.host.address(vm.name)
            if as_json:
                click.echo(json.dumps({**vm.info, "name": address}))
            elif detach or not cmd:
                click.echo(
                    f"{address} booted in {vm.info['boot_s']:.2f} s ({vm.info['accel']}, {vm.info['start']})", err=True
                )
            if detach:
                return 0
            if cmd:
                return await _stream_exec(vm, _command(cmd), env, None, None, use_tty=use_tty)
            click.echo("running; Ctrl-C stops it", err=True)
            await anyio.sleep_forever()
        return 0

    _run(run)


@main.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.argument("name")
@click.option("--env", "env_pairs", multiple=True, metavar="K=V")
@click.option("--cwd", help="Working directory in the guest.")
@click.option("--timeout", type=float, default=None, help="Kill the command after this many seconds.")
@click.option("--tty", "-t", "use_tty", is_flag=True, help="Run CMD on a pseudo-terminal (interactive programs).")
@click.option("--user", "-u", metavar="USER[:GROUP]", help="Run as this user (default: the image's User, else root).")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(name, env_pairs, cwd, timeout, use_tty, user, cmd) -> None:
    """Run CMD in VM NAME (or HOST:NAME), streaming stdin/stdout/stderr; exit with its code."""
    env = _parse_env(env_pairs)

    async def run() -> int:
        async with _connect_address(name) as vm:
            return await _stream_exec(vm, _command(cmd), env, cwd, timeout, use_tty=use_tty, user=user)

    _run(run)


@main.command()
@click.argument("name")
@click.option("--shell", default="/bin/bash", show_default=True, help="Program to run on the terminal.")
def attach(name: str, shell: str) -> None:
    """Open an interactive shell in VM NAME or HOST:NAME (on a pseudo-terminal)."""

    async def run() -> int:
        async with _connect_address(name) as vm:
            return await _stream_exec(vm, [shell, "-l"], {}, "/root", None, use_tty=True)

    _run(run)


@main.command(name="fork")
@click.argument("name")
@click.option("--new-name", help="Sibling name; with -n a prefix: NAME-0, NAME-1, ...")
@click.option("-n", "count", type=int, default=None, help="Number of siblings (default 1).")
@publish_option
@click.option("--detach", "--detached", "-d", is_flag=True, help="Leave the siblings running and return.")
@click.option(
    "--host", "host_specs", multiple=True, metavar="[USER@]HOST",
    help="Spread the siblings over these hosts (repeatable; `local` is this one).",
)  # fmt: skip
@mount_option(copied=False)
@ttl_option
@idle_timeout_option
@on_idle_option
@network_option
@click.option("--json", "as_json", is_flag=True, help="Print the siblings' descriptions as JSON.")
def fork_command(
    name: str, new_name: str | None, count: int | None, ports, detach: bool, host_specs, live_mounts, ttl, idle_timeout,
    on_idle, allow_rules, allow_host_ports, deny_rules, network_closed, as_json,
) -> None:  # fmt: skip
    """Fork running VM NAME into siblings that continue from this instant.

    NAME keeps running; each sibling has NAME's memory, processes and disk as
    they were, copy-on-write, and its own name and hostname.  With --host the
    siblings are placed over the hosts by free memory and CPU.  The network flags give the
    siblings a policy of their own (default: NAME's).
    """

    async def run() -> None:
        network = _network_policy(allow_rules, allow_host_ports, deny_rules, network_closed)
        async with contextlib.AsyncExitStack() as stack:
            hosts = None
            if host_specs:
                from .sdk.host import Host

                hosts = [
                    Host.local() if spec == "local" else await stack.enter_async_context(Host.from_spec(spec))
                    for spec in host_specs
                ]
            source = await stack.enter_async_context(connect(name))
            launch = source.fork(
                count, name=new_name, detached=detach, ports=ports, hosts=hosts, mounts=_mounts(live_mounts), ttl=ttl,
                idle_timeout=idle_timeout, on_idle=on_idle, network=network,
            )  # fmt: skip
            result = await stack.enter_async_context(launch)
            siblings = [result] if isinstance(result, VM) else list(result)
            if as_json:
                click.echo(json.dumps([{**vm.info, "name": vm.host.address(vm.name)} for vm in siblings]))
            else:
                for vm in siblings:
                    click.echo(f"{vm.host.address(vm.name)} forked from {name} in {vm.info['boot_s']:.2f} s", err=True)
                if not detach:
                    click.echo("running; Ctrl-C stops the siblings", err=True)
                    await anyio.sleep_forever()

    _run(run)


@main.command(name="snapshot")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def snapshot_command(name: str, directory: str, as_json: bool) -> None:
    """Write a restorable bundle of running VM NAME to DIRECTORY (the VM keeps running)."""

    async def run() -> None:
        async with connect(name) as vm:
            info = await vm.snapshot(directory)
        if as_json:
            click.echo(json.dumps({"name": name, "bundle": str(info.path), "pause_ms": info.pause_ms,
                                   "write_ms": info.write_ms, "size_bytes": info.size_bytes}))  # fmt: skip
        else:
            click.echo(f"{name} -> {info.path} (paused {info.pause_ms:.0f} ms, {info.size_bytes / 2**20:.0f} MiB)")

    _run(run)


@main.command(name="restore")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", help="Name of the restored VM (default: generated); with -n a prefix: NAME-0, ...")
@click.option("-n", "count", type=int, default=None, help="Start COUNT siblings sharing the bundle's RAM.")
@click.option("--image", help="Rootfs tarball the bundle's VM was booted from, if not the base image.")
@publish_option
@click.option("--boot-timeout", type=float, default=60.0, show_default=True)
@click.option("--detach", "--detached", "-d", is_flag=True, help="Leave the VM running and return.")
@click.option(
    "--host", "host_spec", metavar="[USER@]HOST", help="Push the bundle to HOST over SSH and restore it there."
)
@trust_option
@network_option
@mount_option(copied=False)
@ttl_option
@idle_timeout_option
@on_idle_option
@secret_option
@click.option("--json", "as_json", is_flag=True)
def restore_command(
    directory, name, count, image, ports, boot_timeout, detach, host_spec, trust, allow_rules, allow_host_ports, deny_rules,
    network_closed,
    live_mounts, ttl, idle_timeout, on_idle, secret_specs, as_json,
) -> None:  # fmt: skip
    """Start a VM (or -n siblings) from the bundle in DIRECTORY, where its snapshot left off.

    Its network is closed (a bundle may come from anywhere) unless --network-open or a rule
    (--allow, --allow-host, --deny) says otherwise.  A bundle keeps no secret's value: --secret
    gives it again (bound to the placeholder the guest holds under that name).
    """

    async def run() -> None:
        network = _network_policy(allow_rules, allow_host_ports, deny_rules, network_closed)
        secrets = _secrets(secret_specs)
        async with contextlib.AsyncExitStack() as stack:
            if host_spec is None:
                launch = restore(directory, name=name, n=count, image=image, boot_timeout=boot_timeout,
                                 detached=detach, ports=ports, trust=trust, mounts=_mounts(live_mounts),
                                 network=network, ttl=ttl, secrets=secrets,
                                 idle_timeout=idle_timeout, on_idle=on_idle)  # fmt: skip
            else:
                if image is not None:
                    raise MachinenError("--image and --host do not combine: push sends the image", code="PARSE_ARGS")
                host = await stack.enter_async_context(_ssh_host(host_spec))
                pushed = await host.push(directory, progress=_progress, trust=trust)
                launch = host.restore(pushed.remote_bundle, name=name, n=count, ports=ports, detached=detach,
                                      boot_timeout=boot_timeout, mounts=_mounts(live_mounts),
                                      network=network, ttl=ttl, secrets=secrets,
                                      idle_timeout=idle_timeout, on_idle=on_idle)  # fmt: skip
            result = await stack.enter_async_context(launch)
            vms = [result] if isinstance(result, VM) else list(result)
            if as_json:
                click.echo(json.dumps(vms[0].info if count is None else [vm.info for vm in vms]))
            else:
                for vm in vms:
                    click.echo(f"{vm.name} restored in {vm.info['boot_s']:.2f} s", err=True)
            if not detach:
                click.echo("running; Ctrl-C stops it", err=True)
                await anyio.sleep_forever()

    _run(run)


@main.command(name="gc")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True)
def gc_command(dry_run: bool, as_json: bool) -> None:
    """Remove what no running VM uses: fork templates, disk layers, leftovers of killed VMs,
    transfer chunks and received bundles unused for 7 days, OCI image blobs and flattened
    root filesystems no cached reference names (`machinen images`), and boot templates unused
    for 7 days or of a kernel, initrd or image no longer cached."""
    from .store import boot_templates, chunks

    removed = [
        str(p)
        for p in (
            *registry.collect_stale(dry_run=dry_run),
            *layers.collect_garbage(dry_run=dry_run),
            *chunks.collect_unused(dry_run=dry_run),
            *oci_image.collect_unused(dry_run=dry_run),
            *boot_templates.collect_unused(dry_run=dry_run),
        )
    ]
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": removed}))
    else:
        for path in removed:
            click.echo(("would remove " if dry_run else "removed ") + path)


@main.command(name="pull")
@click.argument("reference")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Default: this host's (linux/amd64 here).")
@click.option("--always", is_flag=True, help="Ask the registry what the tag names now, even if it is cached.")
@insecure_option
@click.option("--json", "as_json", is_flag=True)
def pull_command(reference: str, platform: str | None, always: bool, insecure: tuple[str, ...], as_json: bool) -> None:
    """Fetch an OCI / Docker image (python:3.12-slim, localhost:5000/team/agent@sha256:...,
    oci:DIR[:TAG], docker-archive:FILE) and make it bootable, without booting it."""

    async def run() -> None:
        def fetch() -> dict[str, Any]:
            pulled = oci_pull.pull(reference, policy="always" if always else "missing", platform=platform,
                                   insecure=insecure, progress=_progress)  # fmt: skip
            oci_image.rootfs_tarball(pulled, _progress)
            return {"reference": pulled.reference, "digest": pulled.manifest_digest, "platform": pulled.platform,
                    "layers": len(pulled.layers), "size": sum(layer.size for layer in pulled.layers)}  # fmt: skip

        pulled = await anyio.to_thread.run_sync(fetch)
        click.echo(json.dumps(pulled) if as_json else f"{pulled['reference']}  {pulled['digest']}")

    _run(run)


@main.command(name="images")
@click.option("--json", "as_json", is_flag=True)
def images_command(as_json: bool) -> None:
    """List the OCI images in the cache: reference, digest, size, last used."""
    images = oci_pull.list_images()
    if as_json:
        click.echo(json.dumps([{"reference": image.reference, "platform": image.platform,
                                "digest": image.manifest_digest, "size": image.size, "last_used": image.last_used}
                               for image in images]))  # fmt: skip
        return
    click.echo(f"{'REFERENCE':<50} {'DIGEST':<19} {'SIZE':>10}  LAST USED")
    for image in images:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(image.last_used))
        click.echo(f"{terminal_safe(image.reference):<50} {image.manifest_digest[:19]:<19} "
                   f"{image.size / 2**20:>8.1f}MB  {used}")  # fmt: skip


@main.command(name="ls")
@click.option("--host", "host_specs", multiple=True, metavar="[USER@]HOST", help="List the VMs of HOST (repeatable).")
@click.option(
    "--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
    help="List the VMs of every machinen node of a Ray cluster (default address: auto).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@click.option("--tree", "as_tree", is_flag=True, help="Draw the VMs as their fork tree: children under parents.")
def ls_command(host_specs: tuple[str, ...], ray_address: str | None, as_json: bool, as_tree: bool) -> None:
    """List running VMs (here, on each --host, or on the nodes of a Ray cluster)."""
    if as_tree:
        if host_specs or ray_address is not None:
            raise click.UsageError("--tree draws this machine's VMs only")
        for line in tree_lines(registry.list_rows()):
            click.echo(line)
        return
    if not host_specs and ray_address is None:
        if as_json:
            _run(_print_rows_with_metrics)
        else:
            _print_rows(registry.list_rows(), as_json)
        return

    async def run() -> None:
        rows = []
        for spec in host_specs:
            async with _ssh_host(spec) as host:
                rows += [_row_of(row, spec) for row in _listed(await host.list())]
        if ray_address is not None:
            from .sdk.ray_pool import RayHosts

            async with RayHosts(ray_address) as pool:
                rows += [_row_of(row, _cell(row.get("node"))) for row in _listed(await pool.list())]
        _print_rows(rows, as_json)

    _run(run)


async def _print_rows_with_metrics() -> None:
    """``ls --json`` of this machine: each row with its VM's ``metrics``."""
    rows = registry.list_rows()
    measured = await _metrics_of(rows)
    for row in rows:
        row["metrics"] = measured.get(row["name"]) if isinstance(row["name"], str) else None
    _print_rows(rows, as_json=True)


def _listed(rows: Any) -> list[dict[str, Any]]:
    """A host's VM list as rows, whatever shape the peer sent: a list of maps."""
    if not isinstance(rows, list):
        raise MachinenError(f"a host sent a VM list that is a {type(rows).__name__}", code="HOST_PROTOCOL")
    return [row if isinstance(row, dict) else {"name": row} for row in rows]


def _row_of(row: dict[str, Any], where: str) -> dict[str, Any]:
    return {**row, "name": f"{where}:{_cell(row.get('name'))}"}


def _print_rows(rows: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, default=repr, skipkeys=True))  # what a peer sent: any shape
        return
    click.echo(
        f"{'NAME':<24} {'PID':>8} {'UP':>9} {'TTL':>7} {'ACCEL':<5} {'MEMORY':>7}  {'START':<7} {'FORKED-FROM':<24} PORTS"
    )
    now = time.time()
    for row in rows:
        uptime, memory = row.get("uptime_s"), row.get("memory_mib")
        up = f"{uptime:>8.0f}s" if type(uptime) in (int, float) else f"{_cell(uptime):>9}"
        mib = f"{memory:>5}Mi" if type(memory) is int else f"{_cell(memory):>7}"
        click.echo(
            f"{_cell(row.get('name')):<24} {_cell(row.get('pid')):>8} {up} {_time_left(row.get('deadline'), now):>7} "
            f"{_cell(row.get('accel')):<5} {mib}  {_cell(row.get('start')):<7} {_cell(row.get('forked_from')):<24} "
            f"{_cell(row.get('ports'))}"
        )


def tree_lines(rows: list[VMRow]) -> list[str]:
    """The running VMs as a tree: each under its parent (the last of its lineage) when that one
    runs too, else at the top; with its generation (how many ancestors it has), and its bundle
    if it was restored."""
    names = {row["name"] for row in rows}

    def parent_of(row: VMRow) -> str | None:
        lineage = row.get("lineage") or []
        parent = lineage[-1]["name"] if lineage else None
        return parent if parent in names and parent != row["name"] else None

    children: dict[str | None, list[VMRow]] = {}
    for row in sorted(rows, key=lambda row: row["name"]):
        children.setdefault(parent_of(row), []).append(row)
    lines: list[str] = []
    drawn: set[str] = set()

    def draw(row: VMRow, depth: int) -> None:
        if row["name"] in drawn:
            return
        drawn.add(row["name"])
        restored = row.get("restored_from")
        note = f"  gen {len(row.get('lineage') or [])}" + (f"  restored from {_cell(restored)}" if restored else "")
        lines.append(f"{'  ' * depth}{'└─ ' if depth else ''}{_cell(row['name'])}{note}")
        for child in children.get(row["name"], []):
            draw(child, depth + 1)

    for row in children.get(None, []):
        draw(row, 0)
    for row in sorted(rows, key=lambda row: row["name"]):  # in a loop of parents (none should be): at the top
        draw(row, 0)
    return lines


def _time_left(deadline: object, now: float) -> str:
    """A VM's time to live as a table cell: "-" without a deadline (or a peer's odd value)."""
    left = seconds_left(deadline, now)
    return "-" if left is None else f"{left:.0f}s"


@main.command(name="top")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one table (CPU over one interval) and exit.")
def top_command(interval: float, once: bool) -> None:
    """A live table of this machine's VMs: CPU, guest memory of their own and shared with their
    fork template (counted once per template in the total), and time left."""
    if not 0 < interval < 3600:
        raise click.BadParameter("a number of seconds between 0 and 3600", param_hint="--interval")

    async def run() -> None:
        before, taken = await _measure_all(), time.monotonic()
        while True:
            await anyio.sleep(interval)
            now, at = await _measure_all(), time.monotonic()
            if not once:
                click.clear()
            for line in top_lines(before, now, at - taken, time.time()):
                click.echo(line)
            if once:
                return
            before, taken = now, at

    _run(run)


Measured = dict[str, tuple[VMRow, VMMetrics]]
METRICS_AT_ONCE = 32  # VMs asked for their metrics at once (a connection each)


async def _measure_all() -> Measured:
    """Each running VM's row and metrics (a VM that went meanwhile is left out)."""
    rows = registry.list_rows()
    measured = await _metrics_of(rows)
    return {row["name"]: (row, metrics) for row in rows
            if isinstance(row.get("name"), str) and (metrics := measured.get(row["name"])) is not None}  # fmt: skip


async def _metrics_of(rows: Sequence[VMRow]) -> dict[str, VMMetrics | None]:
    """The metrics of each VM of ``rows`` (of this machine), asked concurrently; None for one that
    did not answer (stopped meanwhile)."""
    measured: dict[str, VMMetrics | None] = {}
    limiter = anyio.CapacityLimiter(METRICS_AT_ONCE)

    async def measure(name: str) -> None:
        async with limiter:
            try:
                async with connect(name) as vm:
                    measured[name] = await vm.metrics()
            except MachinenError:
                measured[name] = None

    async with anyio.create_task_group() as tg:
        for row in rows:
            if isinstance(row.get("name"), str):  # a meta.json of another shape names no VM to ask
                tg.start_soon(measure, row["name"])
    return measured


def top_lines(before: Measured, now: Measured, elapsed_s: float, clock: float) -> list[str]:
    """``machinen top``'s table: CPU % over ``elapsed_s`` (from two measures), private and shared
    guest MiB, time left; a total counting each template's shared pages once (its largest share)."""
    lines = [f"{'NAME':<24} {'PARENT':<24} {'CPU%':>6} {'PRIVATE':>9} {'SHARED':>9} {'TTL':>7}"]
    shared_by_template: dict[str, int] = {}
    private_total = 0
    for name in sorted(now):
        row, metrics = now[name]
        lineage = row.get("lineage") or []
        earlier = before.get(name)
        cpu = "-" if earlier is None else f"{100 * (metrics['cpu_s'] - earlier[1]['cpu_s']) / elapsed_s:.0f}"
        lines.append(
            f"{_cell(name):<24} {_cell(lineage[-1]['name'] if lineage else None):<24} {cpu:>6} "
            f"{metrics['guest_private_bytes'] / 2**20:>7.0f}Mi {metrics['guest_shared_bytes'] / 2**20:>7.0f}Mi "
            f"{_time_left(row.get('deadline'), clock):>7}"
        )
        private_total += metrics["guest_private_bytes"]
        template = metrics["shared_with"]
        if template is not None:
            shared_by_template[template] = max(shared_by_template.get(template, 0), metrics["guest_shared_bytes"])
    shared_total = sum(shared_by_template.values())
    lines.append(f"{'TOTAL':<24} {'':<24} {'':>6} {private_total / 2**20:>7.0f}Mi {shared_total / 2**20:>7.0f}Mi")
    return lines


@main.command(name="stop")
@click.argument("name")
@click.option("--force", is_flag=True, help="SIGKILL the supervisor and QEMU instead of a clean stop.")
@click.option("--json", "as_json", is_flag=True)
def stop_command(name: str, force: bool, as_json: bool) -> None:
    """Stop VM NAME (or HOST:NAME) and remove its files."""

    async def run() -> None:
        host, vm_name = _split_address(name)
        if host is None:
            outcome = await stop_vm(vm_name, force=force)
        else:
            async with host:
                outcome = await host.stop(vm_name, force=force)
        click.echo(json.dumps({"name": name, "stopped": True, "how": outcome}) if as_json else f"{name} {outcome}")

    _run(run)


@main.command()
@click.argument("name")
@click.option("--lines", "-n", type=int, default=50, show_default=True)
@click.option("--workload", is_flag=True, help="The workload's output instead of the console.")
def logs(name: str, lines: int, workload: bool) -> None:
    """Show the tail of VM NAME's console (or of its workload's output)."""

    async def run() -> None:
        entry = registry.find(name)
        if workload:
            async with connect(name) as vm:
                try:
                    text = (await vm.read_file(WORKLOAD_LOG)).decode(errors="replace")
                except GuestFileError:
                    text = ""
        else:
            text = entry.console_log.read_text(errors="replace") if entry.console_log.exists() else ""
        tail = "\n".join(text.splitlines()[-lines:])
        click.echo(terminal_safe(tail) if sys.stdout.isatty() else tail)

    _run(run)


@main.command(name="push")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("host_spec", metavar="[USER@]HOST")
@trust_option
@click.option("--json", "as_json", is_flag=True)
def push_command(directory: str, host_spec: str, trust: bool, as_json: bool) -> None:
    """Copy the bundle in DIRECTORY to HOST over SSH (only what HOST lacks).

    Prints where the bundle is on HOST; `machinen restore --host HOST DIR`
    pushes and restores in one step.
    """

    async def run() -> None:
        async with _ssh_host(host_spec) as host:
            pushed = await host.push(directory, progress=None if as_json else _progress, trust=trust)
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(pushed)))
        else:
            click.echo(
                f"{host_spec}:{pushed.remote_bundle} ({pushed.bytes_sent / 2**20:.1f} MiB sent, "
                f"{pushed.chunks_sent}/{pushed.chunks_total} chunks, {pushed.seconds:.1f} s)"
            )

    _run(run)


@main.command(name="handoff")
@click.argument("name")
@click.argument("host_spec", metavar="[USER@]HOST")
@click.option("--new-name", help="Name on HOST (default: NAME).")
@publish_option
@click.option("--no-precopy", is_flag=True, help="Send everything while paused (longer pause, fewer bytes).")
@click.option("--json", "as_json", is_flag=True)
def handoff_command(name, host_spec, new_name, ports, no_precopy, as_json) -> None:
    """Move running VM NAME to HOST: it stops here once it runs there."""

    async def run() -> None:
        async with _ssh_host(host_spec) as host, connect(name) as vm:
            moved = await vm.handoff(
                host, name=new_name, ports=ports, detached=True, precopy=not no_precopy,
                progress=None if as_json else _progress,
            )  # fmt: skip
            await moved.aclose()
        report = moved.handoff_report
        if as_json:
            click.echo(json.dumps({"name": f"{host_spec}:{moved.name}", **dataclasses.asdict(report)}))
        else:
            click.echo(
                f"{name} -> {host_spec}:{moved.name} (paused {report.paused_ms:.0f} ms, "
                f"{report.bytes_sent / 2**20:.1f} MiB sent, {report.total_s:.1f} s)"
            )

    _run(run)


@main.command(name="mcp")
@click.option(
    "--http",
    "http_address",
    metavar="ADDR:PORT",
    help="Serve streamable HTTP on ADDR:PORT (e.g. 127.0.0.1:8765) instead of stdio; a bearer token is required.",
)
@click.option("--token-file", type=click.Path(dir_okay=False), help="The bearer token (default: a new one, printed).")
@click.option("--max-vms", type=click.IntRange(min=1), help="Refuse to start more VMs than this at once.")
@click.option(
    "--max-memory",
    "max_memory_mib",
    type=click.IntRange(min=64),
    metavar="MIB",
    help="Refuse to start VMs past this much guest memory in all.",
)
@click.option(
    "--secret", "secret_specs", multiple=True, metavar="NAME=ENVVAR@HOST[,HOST...]",
    help="A secret the boot and restore tools may give a VM by NAME (the agent sees names, never the "
         "value: this machine's $ENVVAR); repeatable.",
)  # fmt: skip
def mcp_command(
    http_address: str | None, token_file: str | None, max_vms: int | None, max_memory_mib: int | None,
    secret_specs: tuple[str, ...],
) -> None:  # fmt: skip
    """Serve VMs to an agent over MCP (Model Context Protocol): tools boot, exec, read_file, write_file,
    list_files, fork, snapshot, restore, stop, list.  On stdin/stdout (what Claude Desktop or Claude
    Code start), or with --http on streamable HTTP.  VMs a session boots stop when it ends, unless
    booted detached.  Needs the mcp extra: pip install 'machinen_async[mcp]'."""

    async def run() -> None:
        from .mcp_server import Limits, serve

        await serve(http=http_address, token_file=token_file, limits=Limits(max_vms, max_memory_mib), say=_progress,
                    secrets=_secrets(secret_specs))  # fmt: skip

    _run(run)


@main.command(name="_peer", hidden=True)
def peer_command() -> None:
    """The remote end of an SSH link (started by another host's machinen)."""
    from .hosts.peer import amain

    anyio.run(amain)


# machinen's aliases for ls
main.add_command(ls_command, name="list")
main.add_command(ls_command, name="ps")


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script, e.g. `eval "$(machinen completion bash)"`."""
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)
    assert completer is not None
    click.echo(completer(main, {}, "machinen", "_MACHINEN_COMPLETE").source())


def cli_markdown() -> str:
    """docs/cli.md: every command's ``--help`` (``make docs`` writes it; a test checks it is current)."""
    width = 100  # not the terminal's: the page is the same wherever it is made
    root = click.Context(
        main, info_name="machinen", terminal_width=width, max_content_width=width, **main.context_settings
    )
    pages = [
        "# CLI",
        "",
        "<!-- Generated from machinen_async/cli.py by `make docs`; tests/unit/test_cli_docs.py fails when they differ. -->",
        "",
        "`machinen` (or `mn`, or `python -m machinen_async`); exit codes: the guest command's for `exec` and",
        "`boot -- CMD`; otherwise 0, 1 on error (`error [CODE]: message` on stderr, codes in",
        "[errors.md](errors.md)), 130 on SIGINT, 143 on SIGTERM.",
        "",
        "```text",
        main.get_help(root),
        "```",
    ]
    for name in sorted(main.list_commands(root)):
        command = main.get_command(root, name)
        if command is None or command.hidden:
            continue
        context = click.Context(command, info_name=name, parent=root, **command.context_settings)
        pages += ["", f"## machinen {name}", "", "```text", command.get_help(context), "```"]
    return "\n".join(pages) + "\n"


if __name__ == "__main__":
    main()

"""Host port forward specs: ``"3000:3000"``, ``"0.0.0.0:8080:80"``, ``(3000, 3000)``."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_address

from ..errors import MachinenError

DEFAULT_ADDRESS = "127.0.0.1"
PortSpec = str | tuple[int, int] | tuple[str, int, int]
PortEntry = list[str | int]  # [host address, host port, guest port]: a checked forward on the wire


def _invalid(spec: object, why: str) -> MachinenError:
    return MachinenError(f"invalid port forward {spec!r}: {why}", code="PARSE_PORT_INVALID")


def parse_port_forward(spec: PortSpec | PortEntry) -> PortEntry:
    """``[host address, host port, guest port]``; the address defaults to loopback."""
    if isinstance(spec, str):
        parts: list[object] = [*spec.rsplit(":", 2)]
        if len(parts) == 2:
            parts.insert(0, DEFAULT_ADDRESS)
    elif isinstance(spec, tuple | list):
        parts = [DEFAULT_ADDRESS, *spec] if len(spec) == 2 else list(spec)
    else:
        raise _invalid(spec, "use HOST:GUEST, ADDRESS:HOST:GUEST or a tuple")
    if len(parts) != 3:
        raise _invalid(spec, "use HOST:GUEST or ADDRESS:HOST:GUEST")
    address, host, guest = parts
    address = str(address).strip("[]")
    try:
        ip_address(address)
    except ValueError:
        raise _invalid(spec, f"{address!r} is not an IP address") from None
    ports = []
    for value in (host, guest):
        try:
            port = int(value)  # type: ignore[call-overload]  # whatever was given: refused below unless a port
        except (TypeError, ValueError):
            raise _invalid(spec, f"{value!r} is not a port number") from None
        if not 1 <= port <= 65535 or isinstance(value, bool):
            raise _invalid(spec, f"{value!r} is not in 1-65535")
        ports.append(port)
    return [address, *ports]


def parse_port_forwards(specs: Iterable[PortSpec | PortEntry] | None) -> list[PortEntry]:
    forwards = [parse_port_forward(spec) for spec in specs or ()]
    seen: set[tuple[object, object]] = set()
    for address, host, _ in forwards:
        if (address, host) in seen:
            raise _invalid(f"{address}:{host}", "the same host port is forwarded twice")
        seen.add((address, host))
    return forwards

"""What a guest may reach: ``NetworkPolicy`` (allow and deny rules by address or by name), in the
one form the SDK (to refuse a bad rule with a typed error at once), the requests that carry it, and
the VMM backend's enforcement (``vmm/qemu/netguard.py``, ``vmm/qemu/egress.py``) read.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Self, TypedDict

from ..errors import BootError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    """An address rule: a network, and one port or every port."""

    network: IPNetwork
    port: int | None  # None: every port

    def matches(self, address: IPAddress, port: int) -> bool:
        return address in self.network and self.port in (None, port)


@dataclass(frozen=True)
class NameRule:
    """A name rule: ``api.example.com`` (that name), ``*.example.com`` (every name below it, not
    the name itself), with one port or every port."""

    pattern: str  # lower case, no final dot
    port: int | None

    def matches_name(self, name: str) -> bool:
        if self.pattern.startswith("*."):
            return name.endswith(self.pattern[1:])  # at least one label before ".example.com"
        return name == self.pattern

    def matches(self, name: str, port: int) -> bool:
        return self.matches_name(name) and self.port in (None, port)


# Each used with fullmatch: "$" would let a trailing newline through.
_RULE = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<plain>[^:/]+|[0-9a-fA-F:]+))(?:/(?P<prefix>\d+))?(?::(?P<port>\d+))?")
_NAME_RULE = re.compile(r"(?P<name>(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*)(?::(?P<port>\d+))?")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
MAX_NAME = 253  # RFC 1035: a name's text form, without the final dot


def _bad_rule(text: str) -> BootError:
    return BootError(
        f"bad network rule {text!r:.200}: use a name (api.example.com, *.example.com, either with :PORT), "
        "ADDR, ADDR/PREFIX, ADDR:PORT or [IPV6]:PORT (the host itself, seen from the guest as 10.0.2.2, "
        "is 127.0.0.1)",
        code="BOOT_NETWORK_RULE_INVALID",
    )


def _port(text: str | None) -> int | None:
    if text is None:
        return None
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError
    return port


def parse_rule(text: str) -> Rule:
    """``ADDR``, ``ADDR/PREFIX``, either with ``:PORT``; an IPv6 address with a port in brackets."""
    spec = text.strip()
    match = _RULE.fullmatch(spec)
    try:
        if match is None:
            raise ValueError
        host = match["v6"] or match["plain"]
        if match["v6"] is None and host.count(":") > 1 and match["port"]:  # bare IPv6: no port suffix
            raise ValueError
        network = ipaddress.ip_network(f"{host}/{match['prefix']}" if match["prefix"] else host, strict=False)
        return Rule(network, _port(match["port"]))
    except ValueError:
        raise _bad_rule(text) from None


def normal_name(name: str) -> str | None:
    """A DNS name as rules compare it (lower case, no final dot), or None if it is not a host name."""
    name = name.lower().removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > MAX_NAME or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return name


def parse_target(text: str) -> Rule | NameRule:
    """An address rule (``parse_rule``), else a name rule: ``NAME`` or ``*.NAME``, either with ``:PORT``."""
    if type(text) is not str:
        raise _bad_rule(repr(text))
    try:
        return parse_rule(text)
    except BootError:
        pass
    match = _NAME_RULE.fullmatch(text.strip().lower())
    try:
        if match is None:
            raise ValueError
        name = match["name"]
        bare = normal_name(name.removeprefix("*."))
        if bare is None or bare.rsplit(".", 1)[-1].isdigit():  # 1.2.3.400 is a bad address, not a name
            raise ValueError
        return NameRule(name, _port(match["port"]))
    except ValueError:
        raise _bad_rule(text) from None


def _rules(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise BootError(f"NetworkPolicy({what}=...) takes a list of rules, not {value!r:.100}",
                        code="BOOT_NETWORK_RULE_INVALID")  # fmt: skip
    rules = tuple(value)
    for rule in rules:
        parse_target(rule)  # type: ignore[arg-type]  # checked there: a typed error now, not in a supervisor
    return rules  # type: ignore[return-value]


ResolvedName = tuple[str, str, float]  # (an allowed name, an address it resolved to, seconds its answer has left)
MAX_RESOLVED_NAMES = 1024  # what a fork sibling takes over from its source's resolver


def resolved_names(data: object) -> list[ResolvedName]:
    """``[[name, address, seconds left], ...]`` from the wire, checked (BootError otherwise)."""
    if not isinstance(data, list | tuple) or len(data) > MAX_RESOLVED_NAMES:
        raise BootError(f"resolved names are at most {MAX_RESOLVED_NAMES} entries", code="BOOT_NETWORK_RULE_INVALID")
    checked = []
    for entry in data:
        try:
            name, address, left = entry
            if normal_name(name) != name or isinstance(left, bool) or not 0 <= float(left) < 1e9:
                raise ValueError
            checked.append((name, str(ipaddress.ip_address(address)), float(left)))
        except (TypeError, ValueError):
            raise BootError(f"a resolved name is [name, address, seconds left], not {entry!r:.100}",
                            code="BOOT_NETWORK_RULE_INVALID") from None  # fmt: skip
    return checked


class NetworkPolicyEntry(TypedDict):
    """A ``NetworkPolicy`` on the wire and in ``describe()``."""

    allow: list[str]
    deny: list[str]
    default_deny: bool


@dataclass(frozen=True)
class NetworkPolicy:
    """What a VM's guest may reach over its network.

    By default outbound connections are open (through the host's NAT) and the host closed:
    loopback (which the guest reaches as 10.0.2.2), link-local addresses (cloud metadata at
    169.254.169.254), multicast/broadcast and every address of the host's own interfaces.

    ``allow`` takes address rules (``"ADDR"``, ``"ADDR/PREFIX"``, ``"ADDR:PORT"``, ``"[IPV6]:PORT"``;
    ``"127.0.0.1:PORT"`` opens a service of the host's loopback, ``host_ports``) and name rules
    (``"api.example.com"``, ``"*.example.com"``, ``"db.internal:5432"``).  An address rule reopens
    what the host closes.  A name rule makes the policy an allow list: the guest's DNS, answered
    by a resolver of the host, resolves only allowed names; a connection goes only to an address
    rule or to an address an allowed name resolved to for this VM, and a TLS or HTTP connection
    only when its SNI or Host is such a name.  ``deny`` (names and addresses) wins over ``allow``.
    ``closed()``: an allow list from the start (nothing at all without ``allow``).
    """

    allow: Sequence[str] = ()
    deny: Sequence[str] = ()
    default_deny: bool = False  # an allow list even without a name rule (``closed()``)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", _rules(self.allow, "allow"))
        object.__setattr__(self, "deny", _rules(self.deny, "deny"))
        if type(self.default_deny) is not bool:
            raise BootError("NetworkPolicy(default_deny=...) is True or False", code="BOOT_NETWORK_RULE_INVALID")

    @classmethod
    def closed(cls, *, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> Self:
        """Nothing reachable but ``allow``."""
        return cls(allow=allow, deny=deny, default_deny=True)

    @classmethod
    def host_ports(cls, *ports: int, allow: Sequence[str] = ()) -> Self:
        """The host's loopback services on ``ports`` (guest: 10.0.2.2:PORT), plus ``allow``."""
        return cls(allow=(*(f"127.0.0.1:{port}" for port in ports), *allow))

    # Cached: netguard asks these for every connection QEMU makes (a policy never changes; a new one
    # replaces it).
    @cached_property
    def _allowed(self) -> tuple[Rule | NameRule, ...]:
        return tuple(parse_target(rule) for rule in self.allow)

    @cached_property
    def _denied(self) -> tuple[Rule | NameRule, ...]:
        return tuple(parse_target(rule) for rule in self.deny)

    @cached_property
    def allowed_addresses(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self._allowed if isinstance(rule, Rule))

    @cached_property
    def denied_addresses(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self._denied if isinstance(rule, Rule))

    @cached_property
    def allowed_names(self) -> tuple[NameRule, ...]:
        return tuple(rule for rule in self._allowed if isinstance(rule, NameRule))

    @cached_property
    def denied_names(self) -> tuple[NameRule, ...]:
        return tuple(rule for rule in self._denied if isinstance(rule, NameRule))

    @cached_property
    def is_allow_list(self) -> bool:
        """Whether only what ``allow`` names is reachable (``closed()``, or a name rule)."""
        return self.default_deny or bool(self.allowed_names)

    def resolves(self, name: str) -> bool:
        """Whether the guest's DNS may resolve ``name`` (a ``normal_name``)."""
        if any(rule.matches_name(name) for rule in self.denied_names):
            return False
        return not self.is_allow_list or any(rule.matches_name(name) for rule in self.allowed_names)

    def reaches(self, name: str, port: int) -> bool:
        """Whether a connection that names ``name`` (SNI, Host, or the name an address was
        resolved from) may go to ``port``."""
        if any(rule.matches(name, port) for rule in self.denied_names):
            return False
        return not self.is_allow_list or any(rule.matches(name, port) for rule in self.allowed_names)

    def to_wire(self) -> NetworkPolicyEntry:
        return {"allow": list(self.allow), "deny": list(self.deny), "default_deny": self.default_deny}

    @classmethod
    def from_wire(cls, data: object) -> NetworkPolicy:
        if isinstance(data, NetworkPolicy):
            return data
        if not isinstance(data, dict) or not set(data) <= {"allow", "deny", "default_deny"}:
            raise BootError(f"a network policy is {{allow, deny, default_deny}}, not {data!r:.200}",
                            code="BOOT_NETWORK_RULE_INVALID")  # fmt: skip
        for key in ("allow", "deny"):
            if not isinstance(data.get(key, []), list | tuple):
                raise BootError(f"a network policy's {key} is a list", code="BOOT_NETWORK_RULE_INVALID")
        return cls(allow=data.get("allow", ()), deny=data.get("deny", ()), default_deny=data.get("default_deny", False))

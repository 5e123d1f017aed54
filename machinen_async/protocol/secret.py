"""A secret the host puts into a VM's outbound requests, never into the VM (``boot(secrets=)``):
its name, value, the hosts it may go to and the placeholder the guest holds instead.  Read by the
SDK (to refuse a bad one at once), the supervisor and the egress proxy (``vmm/qemu/secrets.py``)."""

from __future__ import annotations

import re
import secrets as random_tokens
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import BootError
from .netpolicy import NameRule, parse_target

PLACEHOLDER_PREFIX = "machinen-secret-"
# Each used with fullmatch: "$" would let a trailing newline through.
_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")  # an environment variable's name
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")  # RFC 9110 field-value, ASCII
_PLACEHOLDER_BYTES = 12
_PLACEHOLDER = re.compile(rf"{PLACEHOLDER_PREFIX}([A-Za-z_][A-Za-z0-9_]{{0,127}})-[0-9a-f]{{{2 * _PLACEHOLDER_BYTES}}}")


def placeholder_for(name: str) -> str:
    """What the guest sees instead of secret ``name``'s value: new random bits at each call."""
    return f"{PLACEHOLDER_PREFIX}{name}-{random_tokens.token_hex(_PLACEHOLDER_BYTES)}"


def _invalid(message: str) -> BootError:
    return BootError(message, code="BOOT_SECRET_INVALID")


MAX_SECRETS = 64  # per VM: a bundle's list is read from wherever it was copied from


@dataclass(frozen=True)
class SecretSlot:
    """A secret as a VM's bundles and fork templates remember it: its ``name``, the ``hosts`` it
    may go to and the ``placeholder`` the guest holds; never its value.  A restore given the value
    again (``restore(secrets=)``) binds it to the same placeholder, which the guest's processes
    still hold."""

    name: str
    hosts: tuple[str, ...]
    placeholder: str

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "hosts", _host_patterns(self.name, self.hosts))
        _check_placeholder(self.name, self.placeholder)

    def to_map(self) -> dict[str, object]:
        return {"name": self.name, "hosts": list(self.hosts), "placeholder": self.placeholder}

    @classmethod
    def all_from(cls, entries: object) -> tuple[SecretSlot, ...]:
        """Slots from their ``to_map`` list (hostile: a bundle's), BOOT_SECRET_INVALID if not that."""
        if not isinstance(entries, list | tuple) or len(entries) > MAX_SECRETS:
            raise _invalid(f"a list of at most {MAX_SECRETS} secrets, not {type(entries).__name__}")
        slots = []
        for entry in entries:
            if isinstance(entry, SecretSlot):
                slots.append(entry)
                continue
            if not isinstance(entry, dict) or set(entry) != {"name", "hosts", "placeholder"}:
                raise _invalid("a secret is {name, hosts, placeholder}")
            slots.append(cls(entry["name"], entry["hosts"], entry["placeholder"]))
        if len({slot.name for slot in slots}) != len(slots):
            raise _invalid("a secret is named twice")
        return tuple(slots)


# The request headers a placeholder is replaced in unless a secret names its own: where API keys go.
# Never Host, nor headers servers echo or store (Origin, X-Request-Id, Content-Type, x-amz-meta-*).
DEFAULT_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
                   "x-auth-token", "private-token")  # fmt: skip
NEVER_HEADERS = frozenset({"host", "origin", "referer", "content-type", "content-length", "transfer-encoding"})
SECRET_PORT = 443  # a host named without a port: its HTTPS port only
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}")  # RFC 9110 token, as h11 gives them (lower case)


@dataclass(frozen=True)
class SecretRule:
    """A secret for one VM: its ``name`` (the guest's environment variable), its ``value`` (never
    shown: not in ``repr``), the ``hosts`` it may go to (name patterns as ``NetworkPolicy`` takes
    them: ``api.example.com``, ``*.example.com``, with ``:PORT`` for another port than 443), the
    request ``headers`` it may go in (``DEFAULT_HEADERS``) and the ``placeholder`` the guest holds
    instead (made by ``placeholder_for`` when not given)."""

    name: str
    value: str = field(repr=False)
    hosts: tuple[str, ...]
    placeholder: str = ""
    headers: tuple[str, ...] = DEFAULT_HEADERS

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.value, str) or not _HEADER_VALUE.fullmatch(self.value):
            raise _invalid(f"secret {self.name}: its value must be printable ASCII without surrounding spaces "
                           "(it goes into HTTP headers)")  # fmt: skip
        object.__setattr__(self, "hosts", _host_patterns(self.name, self.hosts))
        object.__setattr__(self, "headers", _header_names(self.name, self.headers))
        if not self.placeholder:
            object.__setattr__(self, "placeholder", placeholder_for(self.name))
        _check_placeholder(self.name, self.placeholder)

    @property
    def slot(self) -> SecretSlot:
        return SecretSlot(self.name, self.hosts, self.placeholder)

    @cached_property
    def rules(self) -> tuple[NameRule, ...]:
        """Its hosts as name rules, each with its port (443 when not named)."""
        rules = [_host_rule(host) for host in self.hosts]
        return tuple(NameRule(rule.pattern, rule.port or SECRET_PORT) for rule in rules if rule is not None)

    @property
    def names(self) -> tuple[str, ...]:
        """Its host patterns without ports (what the VM's CA may vouch for)."""
        return tuple(rule.pattern for rule in self.rules)

    def goes_to(self, name: str, port: int) -> bool:
        """Whether the value may be sent to host ``name`` (a ``normal_name``) on ``port``."""
        return any(rule.matches(name, port) for rule in self.rules)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _SECRET_NAME.fullmatch(name):
        raise _invalid(f"a secret's name is an environment variable's name, not {name!r:.100}")


def _check_placeholder(name: str, placeholder: object) -> None:
    """Only what ``placeholder_for`` makes: one read from a bundle (hostile) cannot be text that
    benign requests carry anyway ("application/json"), which the proxy would then replace."""
    made = _PLACEHOLDER.fullmatch(placeholder) if isinstance(placeholder, str) else None
    if made is None or made.group(1) != name:
        raise _invalid(f"secret {name}: a placeholder is {PLACEHOLDER_PREFIX}{name}-<24 hex digits>")


def _host_patterns(name: str, hosts: object) -> tuple[str, ...]:
    """``hosts`` as name patterns (``NAME[:PORT]``), checked."""
    if isinstance(hosts, str) or not isinstance(hosts, Iterable):
        raise _invalid(f"secret {name}: hosts is a list of host names, not {hosts!r:.100}")
    patterns: list[str] = []
    for host in hosts:
        rule = _host_rule(host)
        if rule is None:
            raise _invalid(f"secret {name}: {host!r:.100} is not a host name (api.example.com, *.example.com, "
                           "either with :PORT; a wildcard names at least two labels)")  # fmt: skip
        patterns.append(rule.pattern if rule.port is None else f"{rule.pattern}:{rule.port}")
        if len(patterns) > MAX_SECRETS:
            raise _invalid(f"secret {name}: at most {MAX_SECRETS} hosts")
    if not patterns:
        raise _invalid(f"secret {name}: name at least one host it may be sent to")
    return tuple(patterns)


def _host_rule(host: object) -> NameRule | None:
    """A host pattern as a name rule, or None if it is not one.  A wildcard must name two labels
    at least: "*.com" would send the value to whoever holds any certificate under .com."""
    if not isinstance(host, str):
        return None
    try:
        rule = parse_target(host)
    except BootError:
        return None
    if not isinstance(rule, NameRule) or (rule.pattern.startswith("*.") and "." not in rule.pattern[2:]):
        return None
    return rule


def _header_names(name: str, headers: object) -> tuple[str, ...]:
    """The request headers a secret may go in: lower-case field names, never one a server echoes
    or routes by (``NEVER_HEADERS``)."""
    if isinstance(headers, str) or not isinstance(headers, Iterable):
        raise _invalid(f"secret {name}: headers is a list of header names, not {headers!r:.100}")
    names = tuple(header.lower() if isinstance(header, str) else header for header in headers)
    for header in names:
        if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header) or header in NEVER_HEADERS:
            raise _invalid(f"secret {name}: {header!r:.100} is not a header a secret may go in")
    if not names or len(names) > MAX_SECRETS:
        raise _invalid(f"secret {name}: name 1 to {MAX_SECRETS} headers it may go in")
    return names

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
_SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")  # an environment variable's name
_HEADER_VALUE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")  # RFC 9110 field-value, ASCII


def placeholder_for(name: str) -> str:
    """What the guest sees instead of secret ``name``'s value: new random bits at each call."""
    return f"{PLACEHOLDER_PREFIX}{name}-{random_tokens.token_hex(12)}"


def _invalid(message: str) -> BootError:
    return BootError(message, code="BOOT_SECRET_INVALID")


@dataclass(frozen=True)
class SecretRule:
    """A secret for one VM: its ``name`` (the guest's environment variable), its ``value`` (never
    shown: not in ``repr``), the ``hosts`` it may go to (name patterns as ``NetworkPolicy`` takes
    them, without port: ``api.example.com``, ``*.example.com``) and the ``placeholder`` the guest
    holds instead (made by ``placeholder_for`` when not given)."""

    name: str
    value: str = field(repr=False)
    hosts: tuple[str, ...]
    placeholder: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _SECRET_NAME.match(self.name):
            raise _invalid(f"a secret's name is an environment variable's name, not {self.name!r:.100}")
        if not isinstance(self.value, str) or not _HEADER_VALUE.match(self.value):
            raise _invalid(f"secret {self.name}: its value must be printable ASCII without surrounding spaces "
                           "(it goes into HTTP headers)")  # fmt: skip
        if isinstance(self.hosts, str) or not isinstance(self.hosts, Iterable):
            raise _invalid(f"secret {self.name}: hosts is a list of host names, not {self.hosts!r:.100}")
        patterns: list[str] = []
        for host in self.hosts:
            rule = _host_rule(host)
            if rule is None:
                raise _invalid(f"secret {self.name}: {host!r:.100} is not a host name (api.example.com, *.example.com)")
            patterns.append(rule.pattern)
        if not patterns:
            raise _invalid(f"secret {self.name}: name at least one host it may be sent to")
        object.__setattr__(self, "hosts", tuple(patterns))
        if not self.placeholder:
            object.__setattr__(self, "placeholder", placeholder_for(self.name))
        elif not _HEADER_VALUE.match(self.placeholder) or len(self.placeholder) < 16:
            raise _invalid(f"secret {self.name}: a placeholder is 16 or more printable ASCII characters")

    @cached_property
    def rules(self) -> tuple[NameRule, ...]:
        return tuple(NameRule(pattern, None) for pattern in self.hosts)

    def goes_to(self, name: str) -> bool:
        """Whether the value may be sent to host ``name`` (a ``normal_name``)."""
        return any(rule.matches_name(name) for rule in self.rules)


def _host_rule(host: object) -> NameRule | None:
    """A host pattern as a name rule without port, or None if it is not one."""
    if not isinstance(host, str):
        return None
    try:
        rule = parse_target(host)
    except BootError:
        return None
    return rule if isinstance(rule, NameRule) and rule.port is None else None

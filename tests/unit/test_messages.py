"""The typed contracts between processes: round trips, and malformed ones refused with typed errors."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from machinen_async import MachinenError
from machinen_async.protocol.guest_abi import ExecRequest
from machinen_async.protocol.messages import (
    BootRequest,
    ForkRequest,
    ForkTemplate,
    IncomingState,
    MachineSpec,
    MountBinding,
    PortForward,
    RestoreRequest,
)
from machinen_async.protocol.netpolicy import NetworkPolicy
from machinen_async.supervisor.config import SupervisorConfig

MACHINE = MachineSpec(memory_mib=256, cpus=1, accel="tcg", kernel="/k", initrd="/i", image="/img", tsc_khz=2000000,
                      network_policy=NetworkPolicy(allow=("127.0.0.1:8080", "*.pypi.org")), image_key="abc")  # fmt: skip
INCOMING = IncomingState(chain=[["/l/disk", "qcow2"], ["/img", "raw"]], disk_size=2 << 30, holds=["/t"],
                         ram_in_state=False, source="a", state="/t/state", mem="/t/mem")  # fmt: skip


def test_round_trips_through_json_and_msgpack_shapes():
    template = ForkTemplate(INCOMING, MACHINE, pause_ms=61.5, pause_steps_ms={"total": 61.5})
    assert ForkTemplate.from_wire(json.loads(json.dumps(template.to_wire()))) == template
    config = SupervisorConfig(name="b", machine=MACHINE, ram_dir="/r", boot_timeout=60, detached=False,
                              ports=[["127.0.0.1", 8080, 80]], incoming=INCOMING)  # fmt: skip
    assert SupervisorConfig.from_json(config.to_json()) == config
    booted = SupervisorConfig(name="c", machine=MACHINE, ram_dir="/r", boot_timeout=60, detached=True)
    assert SupervisorConfig.from_json(booted.to_json()) == booted
    request = ExecRequest(["sh", "-c", "true"], env={"A": "1"}, cwd="/tmp", stdin=True, timeout=5, tty=True, rows=40,
                          user="app:1000")  # fmt: skip
    again = ExecRequest.from_wire(request.to_wire())
    assert [getattr(again, key) for key in ExecRequest.__slots__] == [
        getattr(request, k) for k in ExecRequest.__slots__
    ]


@pytest.mark.parametrize(
    "broken",
    [[], {**MACHINE.to_wire(), "surprise": 1}, {key: v for key, v in MACHINE.to_wire().items() if key != "kernel"}],
)
def test_a_malformed_machine_is_refused_by_name(broken):
    with pytest.raises(MachinenError) as refused:
        MachineSpec.from_wire(broken)
    assert refused.value.code == "HOST_PROTOCOL"


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"argv": []},
        {"argv": "sh"},
        {"argv": ["sh", 1]},
        {"argv": ["sh"], "env": {"A": 1}},
        {"argv": ["sh"], "cwd": 3},
        {"argv": ["sh"], "timeout": -1},
        {"argv": ["sh"], "timeout": True},
        {"argv": ["sh"], "stdin": "yes"},
        {"argv": ["sh"], "tty": True, "rows": 1 << 20},
        {"argv": ["sh"], "extra": 1},
        {"argv": ["sh"], "user": 0},
        {"argv": ["sh"], "user": ""},
        {"argv": ["sh"], "user": "a:b:c"},
    ],
)
def test_a_malformed_exec_request_is_refused(params):
    with pytest.raises(ValueError):
        ExecRequest.from_wire(params)


@given(st.dictionaries(st.sampled_from([*ExecRequest.__slots__, "x"]), st.from_type(object) | st.lists(st.text())))
def test_any_exec_params_give_a_request_or_a_value_error(params):
    try:
        request = ExecRequest.from_wire(params)
    except ValueError:
        return
    assert request.argv and all(isinstance(arg, str) for arg in request.argv)


# What a host driver is asked to start: one typed request each, the same over every link.
BOOT = BootRequest(
    name="web", image="oci:/srv/layout:1", memory_mib=512, cpus=2, accel="tcg", boot_timeout=90, detached=True,
    ports=(PortForward("127.0.0.1", 8080, 80),), network=True, network_policy=NetworkPolicy(allow=("10.1.0.0/16", "api.example.com:443"), deny=("x.example.com",)),
    workload={"cmd": ["python3", "-m", "http.server"], "env": {"A": "1"}, "cwd": "/srv"}, start_workload=False,
    mounts=(MountBinding("/srv/data", "/data", True),), pull="always", insecure=("10.0.0.0/8",),
    credentials=("user", "hunter2"), warm=False,
)  # fmt: skip
FORK = ForkRequest(("a-0", "a-1"), detached=True, boot_timeout=30, mounts=(MountBinding("", "/data"),),
                   network_policy=NetworkPolicy.closed(allow=("pypi.org",)))  # fmt: skip
RESTORE = RestoreRequest("/b/bundle", ("r",), ports=(PortForward("0.0.0.0", 9000, 90),), image="/img.tar",
                         accel="kvm", trust=True, network_policy=NetworkPolicy(allow=("127.0.0.1:11434",)))  # fmt: skip


@pytest.mark.parametrize("request_", [BOOT, FORK, RESTORE, BootRequest(name="plain")], ids=repr)
def test_launch_requests_round_trip_as_the_peer_link_carries_them(request_):
    wire = msgpack.unpackb(msgpack.packb(request_.to_wire()))  # lists for tuples, as on the link
    assert type(request_).from_wire(wire) == request_


def test_a_request_takes_specs_as_users_write_them_and_hides_credentials():
    request = BootRequest(name="x", ports=["3000:3000", ("0.0.0.0", 8080, 80)], mounts=[["/h", "/g", False]],
                          network_policy={"allow": ["10.0.0.1:53"]}, credentials=["u", "secret"])  # fmt: skip
    assert request.ports == (PortForward("127.0.0.1", 3000, 3000), PortForward("0.0.0.0", 8080, 80))
    assert request.mounts == (MountBinding("/h", "/g", False),) and request.credentials == ("u", "secret")
    assert request.network_policy == NetworkPolicy(allow=("10.0.0.1:53",))
    assert "secret" not in repr(request)


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: BootRequest(name="x", memory_mib=32), "BOOT_MEMORY_INVALID"),
        (lambda: BootRequest(name="x", memory_mib=True), "BOOT_MEMORY_INVALID"),
        (lambda: BootRequest(name="x", cpus=0), "BOOT_CPUS_INVALID"),
        (lambda: BootRequest(name="x", boot_timeout=float("nan")), "BOOT_TIMEOUT_INVALID"),
        (lambda: BootRequest(name="x", boot_timeout=-1), "BOOT_TIMEOUT_INVALID"),
        (lambda: BootRequest(name="x", pull="sometimes"), "IMAGE_PULL_POLICY_INVALID"),
        (lambda: BootRequest(name="x", credentials=("only-user",)), "IMAGE_CREDENTIALS_INVALID"),
        (lambda: BootRequest(name="x", network_policy={"allow": ["no where"]}), "BOOT_NETWORK_RULE_INVALID"),
        (lambda: BootRequest(name="x", network_policy={"allow": "pypi.org"}), "BOOT_NETWORK_RULE_INVALID"),
        (lambda: BootRequest(name="x", network_policy={"open": True}), "BOOT_NETWORK_RULE_INVALID"),
        (lambda: ForkRequest(("a",), network_policy={"deny": ["1.2.3.4:0"]}), "BOOT_NETWORK_RULE_INVALID"),
        (lambda: BootRequest(name="x", ports=["3000:3000", "3000:4000"]), "PARSE_PORT_INVALID"),
        (lambda: BootRequest(name="x", ports="3000:3000"), "PARSE_PORT_INVALID"),
        (lambda: BootRequest(name="x", mounts=[["relative", "/g", False]]), "MOUNT_SPEC_INVALID"),
        (lambda: BootRequest(name="x", mounts=[["", "/g", False]]), "MOUNT_SPEC_INVALID"),  # nothing to drop
        (lambda: BootRequest(name="x", mounts=[["/a", "/g", False], ["/b", "/g", True]]), "MOUNT_SPEC_INVALID"),
        (lambda: BootRequest(name="x", workload={"cmd": "sh"}), "HOST_PROTOCOL"),
        (lambda: BootRequest(name="x", workload={"shell": ["sh"]}), "HOST_PROTOCOL"),
        (lambda: BootRequest(name="x", warm="yes"), "HOST_PROTOCOL"),
        (lambda: BootRequest(name=7), "HOST_PROTOCOL"),
        (lambda: BootRequest.from_wire({**BOOT.to_wire(), "surprise": 1}), "HOST_PROTOCOL"),
        (lambda: BootRequest.from_wire({"image": "x"}), "HOST_PROTOCOL"),  # no name
        (lambda: BootRequest.from_wire(["web"]), "HOST_PROTOCOL"),
        (lambda: ForkRequest(("a", 1)), "HOST_PROTOCOL"),
        (lambda: ForkRequest(("a", "b"), ports=["3000:3000"]), "PARSE_PORT_INVALID"),
        (lambda: RestoreRequest("/b", ()), "HOST_PROTOCOL"),
        (lambda: RestoreRequest("/b", ("a",), siblings=True, ports=["3000:3000"]), "PARSE_PORT_INVALID"),
        (lambda: RestoreRequest(None, ("a",)), "HOST_PROTOCOL"),
    ],
)
def test_a_malformed_request_is_refused_with_its_code(make, code):
    with pytest.raises(MachinenError) as refused:
        make()
    assert refused.value.code == code


@given(st.dictionaries(st.sampled_from(sorted(BOOT.to_wire())), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)))  # fmt: skip
def test_any_boot_params_give_a_request_or_a_typed_error(params):
    """What a peer receives is any msgpack: it becomes a checked request or a MachinenError."""
    try:
        request = BootRequest.from_wire({**BOOT.to_wire(), **params})
    except MachinenError:
        return
    assert BootRequest.from_wire(request.to_wire()) == request

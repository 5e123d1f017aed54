"""The typed contracts between processes: round trips, and malformed ones refused with typed errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from machinen_async import MachinenError
from machinen_async.protocol.guest_abi import ExecRequest
from machinen_async.protocol.messages import ForkTemplate, IncomingState, MachineSpec
from machinen_async.supervisor.config import SupervisorConfig

MACHINE = MachineSpec(memory_mib=256, cpus=1, accel="tcg", kernel="/k", initrd="/i", image="/img", tsc_khz=2000000,
                      network_allow=("127.0.0.1:8080",), image_key="abc")  # fmt: skip
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

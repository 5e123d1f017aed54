"""Per-VM supervisor process: ``python -m machinen_async.supervisor CONFIG_JSON``.

It owns everything one VM is made of -- the registry entry (name lock),
QEMU, QMP, the agent channel, the RAM file and the disk overlay -- and serves
a 0600 unix socket that any number of clients (SDK, CLI, other processes)
use at once.  Client frames are relayed to the guest agent with stream ids
rewritten, so flow control stays end to end; methods named ``vm.*`` are
answered here.

- ``config.py``: what the launcher hands over (``SupervisorConfig``, ``DETACH``);
- ``relay.py``: the agent session and the routes of calls through it;
- ``capture.py``: the disk chain, RAM and VMM, and capturing them (fork templates, bundles);
- ``forwards.py``: host TCP ports relayed to guest ports;
- ``server.py``: ``Supervisor``, bringing the VM up, serving its clients, taking it down;
- ``main.py``: the process (startup line, signals, the launcher's lifeline);
- ``zygote.py``: many supervisor processes from one warm interpreter.
"""

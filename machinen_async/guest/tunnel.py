"""``tunnel``: a TCP connection to a guest port, for host port forwards."""

from __future__ import annotations

import socket
import threading

from ..protocol import wire
from .task import InputPump, Task, start_thread


class TunnelTask(Task):
    """A TCP connection to a guest port, relayed over the call's fds 0 (in) and 1 (out).

    Host port forwards use it, so they need no guest network device and work
    the same in forks and restores.
    """

    input: InputPump | None  # Task's, set here once connected
    sock: socket.socket
    outbound: threading.Thread

    def start(self, params: wire.Params) -> None:
        try:
            self.sock = socket.create_connection(("127.0.0.1", int(params["port"])), timeout=5)
        except OSError as exc:
            return self.fail("TUNNEL_CONNECT_FAILED", f"guest port {params['port']}: {exc.strerror or exc}")
        self.sock.settimeout(None)
        self.input = InputPump(self, self.sock.fileno(), self._host_closed)
        self.outbound = start_thread(self._pump)

    def _host_closed(self, broken: bool) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.outbound.join()
        self.sock.close()
        self.finish({})

    def _pump(self) -> None:
        while True:
            try:
                data = self.sock.recv(self.take_credit(wire.STDOUT))
            except OSError:
                data = b""
            if not data or self.cancelled:
                break
            self.spend_credit(wire.STDOUT, len(data))
            self.send([wire.DATA, self.sid, wire.STDOUT, data])
        self.send([wire.EOF, self.sid, wire.STDOUT])

    def on_cancel(self) -> None:
        super().on_cancel()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

"""``AgentCall``: a call the supervisor itself makes to the agent (a port-forward tunnel, a live
mount), with the flow control of the SDK's ``mux.Call``.

Input (fd 0) goes out within the credit the agent granted: a window of ``wire.INITIAL_WINDOW``
bytes to start with, grown by each CREDIT.  Output (fds 1 and 2) is held until its consumer
acknowledges it, which returns that much credit to the agent, so what waits here stays within
the window the relay's route rules hold a hostile guest to (a guest crediting more input than it
was sent, or sending more output than its credit, fails the call with EXEC_PROTOCOL there).
Waiting for credit or output is cancellable at any point: nothing is taken before the wait ends.
"""

from __future__ import annotations

import anyio

from ..errors import ExecError, MachinenError, error_from_code
from ..protocol import wire
from .relay import AgentRelay, ClientConnection


class AgentCall:
    """One call of the supervisor's own: ``open`` it, ``run`` it (in a task of its own, until the
    agent ends it), send and receive meanwhile, ``cancel`` it to abandon it."""

    def __init__(self, relay: AgentRelay, link: ClientConnection, sid: int) -> None:
        """Use ``AgentCall.open``."""
        self._relay = relay
        self._link = link  # the agent's frames for this call arrive in its outbox
        self.sid = sid  # the agent's stream id
        self._send_credit = wire.INITIAL_WINDOW  # input the agent will still take
        self._output = bytearray()  # received, not yet taken by ``receive``
        self._output_ended = False  # EOF on its output, or the call's end: nothing more joins it
        self._changed = anyio.Event()  # fired (then replaced) on credit, output or the call's end
        self.ended: bool = False  # the agent sent the call's outcome
        self.error: tuple[str, str] | None = None  # its code and message, if it failed

    @classmethod
    def open(cls, relay: AgentRelay, method: str, params: wire.Params) -> AgentCall | None:
        """The call, started; None while the agent channel is down (being re-established)."""
        link = ClientConnection(None)
        sid = relay.open_call(link, 1, method, params)
        return None if sid is None else cls(relay, link, sid)

    async def run(self) -> None:
        """Take the agent's frames until it ends the call."""
        async for frame in self._link.outbox:
            kind = wire.kind(frame)
            if kind == wire.DATA:
                self._output += wire.data(frame)[1]
            elif kind == wire.EOF:
                self._output_ended = True
            elif kind == wire.CREDIT:
                self._send_credit += wire.credit(frame)[1]
            else:
                self._end(wire.error(frame) if kind == wire.ERROR else None)
                return
            self._notify()

    def _end(self, error: tuple[str, str] | None) -> None:
        self.ended = self._output_ended = True
        self.error = error
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def failure(self) -> MachinenError:
        """Why the call takes no more input: its error, or that it finished."""
        if self.error is not None:
            return error_from_code(*self.error, unknown=ExecError)
        return ExecError("the call finished; it takes no more input", code="EXEC_STDIN_CLOSED")

    # --- input: to the agent, within its credit ---------------------------------------

    async def room(self) -> int:
        """Wait until the agent takes input; how many bytes (at most a CHUNK) it takes now."""
        while self._send_credit <= 0 and not self.ended:
            await self._changed.wait()
        if self.ended:
            raise self.failure()
        return min(self._send_credit, wire.CHUNK)

    async def send(self, data: bytes) -> None:
        """Send ``data`` in whole pieces: each waits for a CHUNK of credit (or for all that is
        left of ``data``), so a window is never split into slivers.  After a ``room()`` of at
        least ``len(data)`` it does not wait."""
        view = memoryview(data)
        while view:
            while self._send_credit < min(len(view), wire.CHUNK) and not self.ended:
                await self._changed.wait()
            if self.ended:
                raise self.failure()
            piece = min(self._send_credit, wire.CHUNK, len(view))
            self._send_credit -= piece
            self._relay.send([wire.DATA, self.sid, wire.STDIN, bytes(view[:piece])])
            view = view[piece:]

    def send_eof(self) -> None:
        self._relay.send([wire.EOF, self.sid, wire.STDIN])

    # --- output: from the agent, within the window we grant ---------------------------

    async def receive(self) -> bytes:
        """All output received so far, once there is some; b"" once it has ended (its EOF,
        or the call's).  Its credit returns to the agent only with ``acknowledge``."""
        while not self._output and not self._output_ended:
            await self._changed.wait()
        data = bytes(self._output)
        self._output.clear()
        return data

    def acknowledge(self, size: int) -> None:
        """``size`` bytes of output were dealt with: the agent may send that much more."""
        self._relay.send([wire.CREDIT, self.sid, wire.STDOUT, size])

    def cancel(self) -> None:
        """Abandon the call: nothing more of it arrives, and the agent stops its work."""
        self._relay.cancel(self.sid)

"""A stand-in for an OpenAI-compatible model server (there is no LLM API to reach from here).

It answers every chat completion with "stub answer to: <the last user message>",
streamed as server-sent events when asked to, so a real client (the `pi`
coding agent inside a VM) runs its whole request/response path.  Only the
model is fake; the VM, the guest agent and pi are real.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "stub-model"


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content or () if isinstance(part, dict))


class _Handler(BaseHTTPRequestHandler):
    server: StubServer

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode())

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        users = [m for m in request.get("messages", []) if m.get("role") == "user"]
        answer = f"stub answer to: {_text(users[-1]['content']) if users else ''}"
        self.server.prompts.append(answer)
        created = int(time.time())
        if not request.get("stream"):
            body = {"id": "stub", "object": "chat.completion", "created": created, "model": MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
            self._send(200, json.dumps(body).encode())
            return
        chunks = [
            {"delta": {"role": "assistant", "content": ""}, "finish_reason": None},
            {"delta": {"content": answer}, "finish_reason": None},
            {"delta": {}, "finish_reason": "stop"},
        ]
        events = [
            {"id": "stub", "object": "chat.completion.chunk", "created": created, "model": MODEL,
             "choices": [{"index": 0, **chunk}]}
            for chunk in chunks
        ]  # fmt: skip
        events.append({"id": "stub", "object": "chat.completion.chunk", "created": created, "model": MODEL,
                       "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})  # fmt: skip
        body = b"".join(f"data: {json.dumps(event)}\n\n".encode() for event in events) + b"data: [DONE]\n\n"
        self._send(200, body, "text/event-stream")


class StubServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)  # the guest reaches it as 10.0.2.2
        self.prompts: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        self.server_close()

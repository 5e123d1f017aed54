"""A tiny HTTP server that counts hits in memory (runs inside the guest)."""

import json
from http.server import BaseHTTPRequestHandler, HTTPServer

count = 0


class Counter(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        global count
        count += 1
        body = json.dumps({"count": count}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


HTTPServer(("0.0.0.0", 3000), Counter).serve_forever()

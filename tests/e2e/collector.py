"""
A minimal HTTP event collector for the end-to-end tests: every POST body is
appended as one line to a file and answered 200.

    python collector.py PORT FILE
"""

import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with open(self.server.outPath, "ab") as f:  # type: ignore[attr-defined]
            f.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.outPath = sys.argv[2]  # type: ignore[attr-defined]
    server.serve_forever()


if __name__ == "__main__":
    main()

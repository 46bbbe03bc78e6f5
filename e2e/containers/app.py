#!/usr/bin/env python3
"""The containers scenario's application: answers every GET with its version and the caller
identity its sidecar verified (`x-weft-client-identity`, absent when the caller had none)."""
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = os.environ.get("VERSION", "v0")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        who = self.headers.get("x-weft-client-identity", "none")
        body = f"version={VERSION} identity={who}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()

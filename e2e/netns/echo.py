#!/usr/bin/env python3
"""Echo app for the multi-cluster suite: answers `cluster=C zone=Z pod=P`.

Distance between clusters is simulated here, in user space (the lab kernel has no
`tc netem`): a caller from another cluster is answered after the delay the delays file gives
for (caller cluster, this cluster). The caller is the first address in `x-forwarded-for`
(set by this pod's inbound sidecar), else the TCP peer; its cluster is the third octet of a
198.18.K.x address (`cK`). The file is JSON `{"c1": {"c2": 5, "c3": 40}}` (milliseconds) and
is re-read when it changes, so a test can move clusters closer or farther at run time.
"""
import argparse
import json
import os
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, default=8080)
p.add_argument("--cluster", required=True)
p.add_argument("--zone", required=True)
p.add_argument("--pod", required=True)
p.add_argument("--delays", required=True)
args = p.parse_args()

_lock = threading.Lock()
_cache = {"mtime": None, "delays": {}}


def delays():
    try:
        m = os.stat(args.delays).st_mtime_ns
    except OSError:
        return {}
    with _lock:
        if _cache["mtime"] != m:
            try:
                with open(args.delays) as f:
                    _cache["delays"] = json.load(f)
                _cache["mtime"] = m
            except (OSError, ValueError):
                pass
        return _cache["delays"]


def cluster_of(ip):
    parts = ip.split(".")
    if len(parts) == 4 and parts[0] == "198" and parts[1] == "18":
        return "c" + parts[2]
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        xff = self.headers.get("x-forwarded-for", "")
        caller = xff.split(",")[0].strip() if xff else self.client_address[0]
        src = cluster_of(caller)
        if src and src != args.cluster:
            ms = delays().get(src, {}).get(args.cluster, 0)
            if ms > 0:
                time.sleep(ms / 1000.0)
        who = self.headers.get("x-weft-client-identity", "-")
        body = f"cluster={args.cluster} zone={args.zone} pod={args.pod} caller={who}\n".encode()
        # One write for head and body: a pod killed mid-answer loses the whole answer (a
        # retryable reset), never half of one after the head went out.
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        self.wfile.write(head + body)

    def log_message(self, *a):
        pass


class Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


Server(("0.0.0.0", args.port), Handler).serve_forever()

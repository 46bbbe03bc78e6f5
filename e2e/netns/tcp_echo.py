#!/usr/bin/env python3
"""A plain TCP echo for the network-namespace suites: every byte it reads goes back.

Listens on ADDR:PORT for each --port; a port given as PORT:greet is server-first (it sends
one greeting line before reading anything, as MySQL or SMTP do). One thread per connection.
"""
import argparse
import socket
import socketserver
import threading

p = argparse.ArgumentParser()
p.add_argument("--bind", required=True)
p.add_argument("--port", action="append", required=True)
args = p.parse_args()


def handler(greet):
    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            if greet:
                self.request.sendall(b"hello from tcp-echo\n")
            while True:
                data = self.request.recv(4096)
                if not data:
                    return
                self.request.sendall(data)

    return Echo


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


servers = []
for spec in args.port:
    port, _, mode = spec.partition(":")
    s = Server((args.bind, int(port)), handler(mode == "greet"))
    servers.append(s)
    threading.Thread(target=s.serve_forever, daemon=True).start()
threading.Event().wait()

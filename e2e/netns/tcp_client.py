#!/usr/bin/env python3
"""An unmodified TCP client for the network-namespace suites (its connection is intercepted by
the pod's iptables rules; it knows nothing of the mesh).

Connects to HOST:PORT, reads a greeting line first with --greeting, then sends "ping N" every
--interval seconds and expects it echoed, --count times (0: until --duration ends). Prints one
line per round ("ok N", or "closed N" when the connection ended or the echo did not come, then
stops) and exits 0 only when every round was echoed. Bounded: --duration seconds at most.
"""
import argparse
import socket
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("host")
p.add_argument("port", type=int)
p.add_argument("--greeting", action="store_true")
p.add_argument("--count", type=int, default=1)
p.add_argument("--interval", type=float, default=0.1)
p.add_argument("--duration", type=float, default=20.0)
p.add_argument("--timeout", type=float, default=3.0)
args = p.parse_args()
start = time.monotonic()


def say(line):
    print(line, flush=True)


try:
    s = socket.create_connection((args.host, args.port), timeout=args.timeout)
    f = s.makefile("rb")
    if args.greeting:
        line = f.readline()
        if not line:
            say("closed greeting")
            sys.exit(1)
        say("greeting " + line.decode(errors="replace").strip())
except OSError as e:
    say(f"closed connect {e}")
    sys.exit(1)
n = 0
while (args.count == 0 or n < args.count) and time.monotonic() - start < args.duration:
    n += 1
    msg = f"ping {n}\n".encode()
    try:
        s.sendall(msg)
        back = f.readline()
    except OSError:
        back = b""
    if back != msg:
        say(f"closed {n}")
        sys.exit(1)
    say(f"ok {n}")
    time.sleep(args.interval)

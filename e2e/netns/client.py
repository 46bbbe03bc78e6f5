#!/usr/bin/env python3
"""Load client for the multi-cluster suite: an unmodified HTTP client (its connections are
intercepted by the pod's iptables rules, it knows nothing of the mesh).

Sends GET URL at a fixed rate for a bounded time (and at most rate x duration requests), one
new connection per request like curl, and prints one JSON line per request:
{"t": seconds since start, "ok": bool, "status": int, "body": str, "ms": float}.
"""
import argparse
import http.client
import json
import sys
import time
from urllib.parse import urlsplit

p = argparse.ArgumentParser()
p.add_argument("url")
p.add_argument("--rate", type=float, default=50.0)
p.add_argument("--duration", type=float, default=5.0)
p.add_argument("--timeout", type=float, default=5.0)
args = p.parse_args()
u = urlsplit(args.url)
limit = int(args.rate * args.duration)
start = time.monotonic()
for i in range(limit):
    due = start + i / args.rate
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    if time.monotonic() - start > args.duration + 10:
        break
    t0 = time.monotonic()
    rec = {"t": round(t0 - start, 4), "ok": False, "status": 0, "body": ""}
    try:
        c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=args.timeout)
        c.request("GET", u.path or "/")
        r = c.getresponse()
        body = r.read().decode(errors="replace").strip()
        rec.update(status=r.status, body=body, ok=(r.status == 200))
        c.close()
    except Exception as e:  # a failed request is data, not a crash
        rec["body"] = f"error: {e}"
    rec["ms"] = round((time.monotonic() - t0) * 1000, 2)
    print(json.dumps(rec), flush=True)
sys.exit(0)

#!/usr/bin/env python3
"""Minimal gRPC echo server for the Weft xDS interop test.

Serves the unary method ``/weft.test.Echo/Who`` and answers every call with
its ``--name`` (raw bytes). No generated code: the handler uses identity
(de)serializers, so request and response are plain bytes.

On start it prints one JSON line ``{"port": N}`` (the bound port, useful with
port 0) and flushes stdout. It exits cleanly on SIGTERM or SIGINT.
"""

import argparse
import json
import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "weft.test.Echo"
METHOD = "Who"


def _identity(b):
    return b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="IP:PORT to bind (port 0 = pick one)")
    parser.add_argument("--name", required=True, help="the name answered to every call")
    args = parser.parse_args()

    name = args.name.encode()

    def who(_request, _context):
        return name

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                who,
                request_deserializer=_identity,
                response_serializer=_identity,
            )
        },
    )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(args.addr)
    if port == 0:
        print(f"echo_server: cannot bind {args.addr}", file=sys.stderr, flush=True)
        return 1
    server.start()

    stop = threading.Event()

    def on_signal(_signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    print(json.dumps({"port": port}), flush=True)

    # Wait for a signal; the timeout keeps the main thread responsive to it.
    while not stop.wait(timeout=1.0):
        pass
    server.stop(grace=1.0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

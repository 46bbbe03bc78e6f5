#!/usr/bin/env python3
"""xDS client for the Weft interop test.

Opens a grpcio channel to an ``xds:///`` target (the bootstrap file is taken
from ``GRPC_XDS_BOOTSTRAP``), makes up to ``--calls`` unary calls to
``/weft.test.Echo/Who``, each with its own deadline, and prints one JSON line:

    {"counts": {"v1": 900, "v2": 100}, "failures": 0, "errors": [...]}

``counts`` maps each answering server's name to its number of answers,
``failures`` counts failed calls and ``errors`` holds the first few error
strings. It stops after ``--calls`` calls or ``--timeout-s`` seconds,
whichever comes first (calls not made by then are not counted at all).
"""

import argparse
import json
import os
import sys
import time

import grpc

METHOD = "/weft.test.Echo/Who"
MAX_ERRORS = 5


def _identity(b):
    return b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="e.g. xds:///echo.default.svc.cluster.local:50051")
    parser.add_argument("--calls", type=int, required=True, help="number of calls to make")
    parser.add_argument("--timeout-s", type=float, required=True, help="overall time limit in seconds")
    parser.add_argument("--call-deadline-s", type=float, default=5.0, help="deadline of each call")
    args = parser.parse_args()

    if args.target.startswith("xds:") and not os.environ.get("GRPC_XDS_BOOTSTRAP"):
        print("xds_client: GRPC_XDS_BOOTSTRAP is not set", file=sys.stderr, flush=True)
        return 2

    counts = {}
    failures = 0
    errors = []
    end = time.monotonic() + args.timeout_s

    with grpc.insecure_channel(args.target) as channel:
        who = channel.unary_unary(
            METHOD,
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        for _ in range(args.calls):
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            deadline = min(args.call_deadline_s, remaining)
            try:
                # Fail-fast (no wait_for_ready): calls still queue while the
                # channel waits for its first xDS config, but an xDS error
                # (e.g. a NACKed resource) surfaces as UNAVAILABLE with the
                # resolver's message instead of a bare DEADLINE_EXCEEDED.
                reply = who(b"", timeout=deadline)
                key = reply.decode(errors="replace")
                counts[key] = counts.get(key, 0) + 1
            except grpc.RpcError as err:
                failures += 1
                if len(errors) < MAX_ERRORS:
                    errors.append(f"{err.code()}: {err.details()}")

    print(json.dumps({"counts": counts, "failures": failures, "errors": errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

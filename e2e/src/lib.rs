//! End-to-end scenarios live in `e2e/tests/`: the third-party xDS interop test (Python grpcio),
//! and, as they are built, network-namespace scenarios and benchmarks.

//! Every integration test of this crate, one module per file (one binary to build and link).

mod cli;
mod install;
mod replicas;

//! Weft's sidecar injector: the mutating admission webhook and its pure patch function.
//!
//! Not built yet (issue "Kubernetes: the kube source, CRDs, install manifests and the injection
//! webhook"); the crate exists so the workspace has the layout of ARCHITECTURE.md.

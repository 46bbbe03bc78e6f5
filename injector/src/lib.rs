//! `weft-injector`: the mutating admission webhook that adds Weft's sidecar to Pods.
//!
//! - [`patch`]: the injection, a pure function of a Pod (also what `weftctl inject` runs);
//! - [`webhook`]: AdmissionReview in, AdmissionReview out (JSON Patch), with the policy for
//!   errors written down there;
//! - [`server`]: HTTPS on 8443 (`POST /inject`, `GET /ready /live /metrics`), reloading a
//!   rotated certificate.

pub mod patch;
pub mod server;
pub mod webhook;

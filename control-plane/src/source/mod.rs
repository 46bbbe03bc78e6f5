//! Sources turn a world of Kubernetes objects into catalog changes. `file` reads a directory
//! of the same YAML objects Kubernetes would hold: the embedded default for laptops, VMs, the
//! demo and the tests.

pub mod file;
pub mod kube;

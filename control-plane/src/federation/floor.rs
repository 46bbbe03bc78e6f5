//! Version floors: the highest catalog version applied from each peer, kept in `--state-dir`
//! (`federation-versions.json`). A peer's snapshot older than its floor is a rollback — a
//! peer restored from an old state, or an old stream replayed — and is refused with the
//! reason. Catalog versions start at the control plane's start time in microseconds, so a
//! peer that merely restarted sends a higher version than before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::state_file::{self, StateError};

/// The file in `--state-dir`.
pub const FILE: &str = "federation-versions.json";

/// Highest version applied, per peer.
#[derive(Default)]
pub struct Floors {
    path: Option<PathBuf>,
    map: Mutex<BTreeMap<String, u64>>,
}

impl Floors {
    /// The floors in `state_dir`, or in memory without one. A file that does not parse stops
    /// start-up (starting from nothing would accept any rollback).
    pub fn open(state_dir: Option<&Path>) -> Result<Self, StateError> {
        let Some(dir) = state_dir else {
            return Ok(Floors::default());
        };
        let path = dir.join(FILE);
        let map = state_file::read(&path)
            .map_err(|source| StateError {
                path: path.clone(),
                source,
            })?
            .unwrap_or_default();
        Ok(Floors {
            path: Some(path),
            map: Mutex::new(map),
        })
    }

    /// Whether a snapshot at `version` from `peer` is acceptable.
    pub fn check_snapshot(&self, peer: &str, version: u64) -> Result<(), String> {
        match crate::lock(&self.map).get(peer) {
            Some(floor) if version < *floor => Err(format!(
                "snapshot version {version} is older than version {floor} already applied from {peer}: a rollback (the peer restored from an old state, or its clock stepped back), refused"
            )),
            _ => Ok(()),
        }
    }

    /// Records that `version` from `peer` was applied.
    pub fn raise(&self, peer: &str, version: u64) {
        let mut map = crate::lock(&self.map);
        if map.get(peer).is_some_and(|f| *f >= version) {
            return;
        }
        map.insert(peer.to_string(), version);
        if let Some(path) = &self.path
            && let Err(e) = state_file::write(path, &*map)
        {
            tracing::warn!(path = %path.display(), error = %e, "federation version floors not written; they hold in memory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_snapshot_is_refused_even_after_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let floors = Floors::open(Some(dir.path())).expect("open");
        floors.check_snapshot("east", 5).expect("nothing seen yet");
        floors.raise("east", 10);
        floors.raise("east", 7);
        let again = Floors::open(Some(dir.path())).expect("reopen");
        let err = again.check_snapshot("east", 9).expect_err("rollback");
        assert!(err.contains("older than version 10"), "{err}");
        again.check_snapshot("east", 10).expect("the same version");
        again.check_snapshot("west", 1).expect("another peer");
        std::fs::write(dir.path().join(FILE), "[").expect("write");
        assert!(Floors::open(Some(dir.path())).is_err());
    }
}

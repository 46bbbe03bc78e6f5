//! Small JSON files in `--state-dir` (rollouts, the join-token ledger): read whole, written whole to a temporary file and renamed over the old one, so a
//! crash leaves the old file or the new one, never half of either.

use std::path::Path;

/// Why a state file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// It is not the JSON expected.
    #[error("does not parse: {0}")]
    Parse(#[from] serde_json::Error),
}

/// The value in `path`; `None` when there is no such file.
pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, ReadError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes `value` to `path` atomically, creating its directory.
pub fn write<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

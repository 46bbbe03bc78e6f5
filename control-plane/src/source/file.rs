//! The file source: a directory of multi-document Kubernetes YAML (`.yaml`, `.yml`, `.json`),
//! watched for changes.
//!
//! Only files whose modification stamp changed (or that the watcher named) are re-read. A file
//! that does not parse keeps serving the objects it last held; an object that fails validation
//! keeps its last good version (when it had one, from the same file); every problem is reported
//! with the file, the object and the field, and the valid objects still apply.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::Watcher;
use tokio::sync::mpsc;

use crate::catalog::{Catalog, SourceError, SourceUpdate};
use crate::objects::{Object, ObjectKey, parse_object, raw_key};

/// How long to wait after a change event for more before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often the directory is rescanned even without events (a safety net for missed ones).
pub const RESCAN: Duration = Duration::from_secs(5);

/// Errors that stop the file source from starting.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    /// The directory cannot be read.
    #[error("source directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The watcher could not start.
    #[error("watching {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: notify::Error,
    },
}

#[derive(Default)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    /// The objects this file serves (last good versions).
    objects: BTreeMap<ObjectKey, Arc<Object>>,
    errors: Vec<SourceError>,
}

/// The file source's state: per file, what it serves.
pub struct FileSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// What the catalog was last sent: key -> (object, file).
    sent: HashMap<ObjectKey, (Arc<Object>, String)>,
    /// The error list the catalog was last sent.
    sent_errors: Option<Vec<SourceError>>,
}

impl FileSource {
    /// A source over `dir`; nothing is read until [`FileSource::reload`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileSource {
            dir: dir.into(),
            files: BTreeMap::new(),
            sent: HashMap::new(),
            sent_errors: None,
        }
    }

    fn display(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Rescans the directory, re-reading changed files and those in `dirty`, and returns the
    /// changes for the catalog (with the complete current error list).
    pub fn reload(&mut self, dirty: &BTreeSet<PathBuf>) -> Result<SourceUpdate, FileSourceError> {
        let mut present = BTreeMap::new();
        list_files(&self.dir, &mut present).map_err(|source| FileSourceError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        self.files.retain(|p, _| present.contains_key(p));
        for (path, stamp) in present {
            let state = self.files.entry(path.clone()).or_default();
            if state.stamp == Some(stamp) && !dirty.contains(&path) {
                continue;
            }
            state.stamp = Some(stamp);
            let name = path
                .strip_prefix(&self.dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            let previous = std::mem::take(&mut state.objects);
            let (objects, errors) = read_file(&path, &name, previous);
            state.objects = objects;
            state.errors = errors;
        }
        Ok(self.diff())
    }

    fn diff(&mut self) -> SourceUpdate {
        let mut errors = Vec::new();
        let mut now: HashMap<ObjectKey, (Arc<Object>, String)> = HashMap::new();
        for (path, state) in &self.files {
            errors.extend(state.errors.iter().cloned());
            let file = self.display(path);
            for (key, obj) in &state.objects {
                if let Some((_, other)) = now.get(key) {
                    errors.push(SourceError {
                        file: file.clone(),
                        object: key.to_string(),
                        field: "metadata.name".into(),
                        message: format!("also defined in {other}; this definition wins"),
                    });
                }
                now.insert(key.clone(), (obj.clone(), file.clone()));
            }
        }
        let removes: Vec<ObjectKey> = self
            .sent
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        let upserts: Vec<(Arc<Object>, String)> = now
            .iter()
            .filter(|(k, v)| {
                self.sent
                    .get(*k)
                    .is_none_or(|old| !Arc::ptr_eq(&old.0, &v.0) && old.0 != v.0)
            })
            .map(|(_, v)| v.clone())
            .collect();
        self.sent = now;
        let errors = if self.sent_errors.as_ref() == Some(&errors) {
            None
        } else {
            self.sent_errors = Some(errors.clone());
            Some(errors)
        };
        SourceUpdate {
            upserts,
            removes,
            errors,
            initial_sync_done: true,
        }
    }
}

fn list_files(dir: &Path, out: &mut BTreeMap<PathBuf, (SystemTime, u64)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue; // editor swap files, hidden directories
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(_) => continue, // vanished between listing and stat
        };
        if meta.is_dir() {
            list_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.insert(
                path,
                (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                ),
            );
        }
    }
    Ok(())
}

/// Reads one file. On a read or YAML error the file keeps `previous`; an invalid object keeps
/// its previous version from this file.
fn read_file(
    path: &Path,
    name: &str,
    previous: BTreeMap<ObjectKey, Arc<Object>>,
) -> (BTreeMap<ObjectKey, Arc<Object>>, Vec<SourceError>) {
    let file_error = |message: String, previous| {
        let kept = if previous == BTreeMap::new() {
            String::new()
        } else {
            "; its previous objects keep serving".to_string()
        };
        (
            previous,
            vec![SourceError {
                file: name.to_string(),
                object: String::new(),
                field: String::new(),
                message: format!("{message}{kept}"),
            }],
        )
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return file_error(format!("cannot read: {e}"), previous),
    };
    let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple(&text) {
        Ok(d) => d,
        Err(e) => return file_error(format!("not valid YAML: {e}"), previous),
    };
    let mut objects = BTreeMap::new();
    let mut errors = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue; // an empty document between `---` separators
        }
        if !doc.is_object() {
            errors.push(SourceError {
                file: name.to_string(),
                object: format!("document {}", i + 1),
                field: String::new(),
                message: "is not a mapping (a Kubernetes object)".into(),
            });
            continue;
        }
        let key = raw_key(&doc);
        match parse_object(doc) {
            Ok(Some(obj)) => {
                // An unchanged object keeps its Arc, so nothing downstream copies or re-compares it.
                let key = obj.key();
                let obj = match previous.get(&key) {
                    Some(old) if **old == obj => old.clone(),
                    _ => Arc::new(obj),
                };
                objects.insert(key, obj);
            }
            Ok(None) => {}
            Err(e) => {
                let kept = key
                    .as_ref()
                    .and_then(|k| previous.get(k).map(|o| (k.clone(), o.clone())));
                let suffix = if kept.is_some() {
                    "; the last good version keeps serving"
                } else {
                    ""
                };
                errors.push(SourceError {
                    file: name.to_string(),
                    object: if e.object.starts_with('<') {
                        format!("document {}", i + 1)
                    } else {
                        e.object
                    },
                    field: e.field,
                    message: format!("{}{suffix}", e.message),
                });
                if let Some((k, o)) = kept {
                    objects.insert(k, o);
                }
            }
        }
    }
    (objects, errors)
}

/// Reads the directory once and applies it, then keeps watching it until the task is dropped.
pub async fn run(
    dir: PathBuf,
    catalog: Arc<Catalog>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<(), FileSourceError> {
    let mut source = FileSource::new(&dir);
    let update = source.reload(&BTreeSet::new())?;
    log_errors(&update);
    catalog.apply(update);
    metrics.source_reloads.inc();

    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            for p in ev.paths {
                let _ = tx.send(p);
            }
        }
    })
    .map_err(|source| FileSourceError::Watch {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, notify::RecursiveMode::Recursive)
        .map_err(|source| FileSourceError::Watch {
            path: dir.clone(),
            source,
        })?;
    let mut rescan = tokio::time::interval(RESCAN);
    rescan.tick().await;
    loop {
        let mut dirty = BTreeSet::new();
        tokio::select! {
            Some(p) = rx.recv() => {
                dirty.insert(p);
                tokio::time::sleep(DEBOUNCE).await;
                while let Ok(p) = rx.try_recv() {
                    dirty.insert(p);
                }
            }
            _ = rescan.tick() => {}
        }
        match source.reload(&dirty) {
            Ok(update) => {
                if update.is_noop() {
                    continue;
                }
                log_errors(&update);
                catalog.apply(update);
                metrics.source_reloads.inc();
            }
            Err(e) => {
                tracing::error!(error = %e, "file source rescan failed; the last good state keeps serving")
            }
        }
    }
}

fn log_errors(update: &SourceUpdate) {
    for e in update.errors.iter().flatten() {
        tracing::warn!(error = %e, "source error");
    }
    tracing::info!(
        upserts = update.upserts.len(),
        removes = update.removes.len(),
        "file source applied"
    );
}

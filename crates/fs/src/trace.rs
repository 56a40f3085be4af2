//! Recording what a workload touches, in first-access order.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::FsError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Looked up (stat, path walk) and found.
    Lookup,
    /// Looked up and not found: recorded so the index can answer it.
    Missing,
    /// Content opened.
    Open,
    /// Directory listed.
    Readdir,
    /// Symlink target read.
    Readlink,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceEvent {
    /// Relative to the image root, no leading '/'.
    pub path: Vec<u8>,
    pub access: Access,
}

/// Thread-safe recorder; each (path, access) pair is kept once, at its first occurrence.
#[derive(Default)]
pub struct Trace {
    inner: Mutex<(Vec<TraceEvent>, HashSet<TraceEvent>)>,
}

impl Trace {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&self, path: Vec<u8>, access: Access) {
        let ev = TraceEvent { path, access };
        let mut g = self.inner.lock().unwrap();
        if !g.1.contains(&ev) {
            g.1.insert(ev.clone());
            g.0.push(ev);
        }
    }

    pub fn events(&self) -> Vec<TraceEvent> {
        self.inner.lock().unwrap().0.clone()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The on-disk form of a trace (`optimize --trace-out/--trace-in`): JSON,
/// one event per path and access, paths as UTF-8 where they are, hex otherwise.
#[derive(Debug, Serialize, Deserialize)]
pub struct TraceFile {
    pub version: u32,
    pub events: Vec<TraceFileEvent>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TraceFileEvent {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path_hex: Option<String>,
    pub access: Access,
}

impl TraceFile {
    pub fn from_events(events: &[TraceEvent]) -> TraceFile {
        TraceFile {
            version: 1,
            events: events
                .iter()
                .map(|e| match std::str::from_utf8(&e.path) {
                    Ok(s) => TraceFileEvent {
                        path: Some(s.to_string()),
                        path_hex: None,
                        access: e.access,
                    },
                    Err(_) => TraceFileEvent {
                        path: None,
                        path_hex: Some(hex::encode(&e.path)),
                        access: e.access,
                    },
                })
                .collect(),
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), FsError> {
        let data = serde_json::to_vec_pretty(self).expect("serialisable trace");
        std::fs::write(path, data).map_err(|source| FsError::TraceFile {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn read(path: &Path) -> Result<Vec<TraceEvent>, FsError> {
        let data = std::fs::read(path).map_err(|source| FsError::TraceFile {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason: String| FsError::BadTrace {
            path: path.to_path_buf(),
            reason,
        };
        let f: TraceFile = serde_json::from_slice(&data).map_err(|e| bad(e.to_string()))?;
        if f.version != 1 {
            return Err(bad(format!(
                "version {} (this lazylayer reads version 1)",
                f.version
            )));
        }
        f.events
            .into_iter()
            .map(|e| {
                let p = match (e.path, e.path_hex) {
                    (Some(p), _) => p.into_bytes(),
                    (None, Some(h)) => hex::decode(h).map_err(|e| bad(e.to_string()))?,
                    (None, None) => return Err(bad("event without a path".into())),
                };
                let p = p.strip_prefix(b"/").map(|s| s.to_vec()).unwrap_or(p);
                if p.split(|b| *b == b'/').any(|c| c == b"..") {
                    return Err(bad("path with '..'".into()));
                }
                Ok(TraceEvent {
                    path: p,
                    access: e.access,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupes_and_keeps_first_access_order() {
        let t = Trace::new();
        t.record(b"b".to_vec(), Access::Lookup);
        t.record(b"a".to_vec(), Access::Open);
        t.record(b"b".to_vec(), Access::Lookup);
        t.record(b"b".to_vec(), Access::Open);
        let ev = t.events();
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].path, b"b");
        assert_eq!(ev[1].path, b"a");
        assert_eq!(ev[2].access, Access::Open);
    }

    #[test]
    fn trace_file_roundtrip_with_non_utf8_and_rejects_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        let events = vec![
            TraceEvent {
                path: b"usr/bin/x".to_vec(),
                access: Access::Open,
            },
            TraceEvent {
                path: vec![b'a', 0xff, b'b'],
                access: Access::Missing,
            },
        ];
        TraceFile::from_events(&events).write(&p).unwrap();
        assert_eq!(TraceFile::read(&p).unwrap(), events);
        std::fs::write(
            &p,
            r#"{"version":1,"events":[{"path":"a/../../etc","access":"open"}]}"#,
        )
        .unwrap();
        assert!(TraceFile::read(&p).is_err());
        std::fs::write(&p, r#"{"version":9,"events":[]}"#).unwrap();
        assert!(TraceFile::read(&p)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
    }
}

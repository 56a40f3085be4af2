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

/// A byte range of a file that the workload read, in the order it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRead {
    pub path: Vec<u8>,
    pub offset: u64,
    pub len: u64,
}

/// Thread-safe recorder; each (path, access) pair is kept once, at its first
/// occurrence. Reads are kept in order, a read that continues the previous
/// one of the same file merged into it.
#[derive(Default)]
pub struct Trace {
    inner: Mutex<(Vec<TraceEvent>, HashSet<TraceEvent>)>,
    reads: Mutex<Vec<TraceRead>>,
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

    pub fn record_read(&self, path: &[u8], offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut r = self.reads.lock().unwrap();
        if let Some(last) = r.last_mut() {
            if last.path == path && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        r.push(TraceRead {
            path: path.to_vec(),
            offset,
            len,
        });
    }

    pub fn reads(&self) -> Vec<TraceRead> {
        self.reads.lock().unwrap().clone()
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
    /// Byte ranges read, in order (absent from traces of older releases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reads: Vec<TraceFileRead>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TraceFileRead {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path_hex: Option<String>,
    pub offset: u64,
    pub len: u64,
}

/// A path as the trace file holds it: UTF-8 where it is, hex otherwise.
fn path_fields(p: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(p) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (None, Some(hex::encode(p))),
    }
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
            reads: Vec::new(),
        }
    }

    /// With the byte ranges read.
    pub fn with_reads(mut self, reads: &[TraceRead]) -> TraceFile {
        self.reads = reads
            .iter()
            .map(|r| {
                let (path, path_hex) = path_fields(&r.path);
                TraceFileRead {
                    path,
                    path_hex,
                    offset: r.offset,
                    len: r.len,
                }
            })
            .collect();
        self
    }

    pub fn write(&self, path: &Path) -> Result<(), FsError> {
        let data = serde_json::to_vec_pretty(self).expect("serialisable trace");
        std::fs::write(path, data).map_err(|source| FsError::TraceFile {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn read(path: &Path) -> Result<Vec<TraceEvent>, FsError> {
        Self::read_all(path).map(|(events, _)| events)
    }

    /// The events and the byte ranges read.
    pub fn read_all(path: &Path) -> Result<(Vec<TraceEvent>, Vec<TraceRead>), FsError> {
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
        let path_of = |p: Option<String>, h: Option<String>| -> Result<Vec<u8>, FsError> {
            let p = match (p, h) {
                (Some(p), _) => p.into_bytes(),
                (None, Some(h)) => hex::decode(h).map_err(|e| bad(e.to_string()))?,
                (None, None) => return Err(bad("event without a path".into())),
            };
            let p = p.strip_prefix(b"/").map(|s| s.to_vec()).unwrap_or(p);
            if p.split(|b| *b == b'/').any(|c| c == b"..") {
                return Err(bad("path with '..'".into()));
            }
            Ok(p)
        };
        let events = f
            .events
            .into_iter()
            .map(|e| {
                Ok(TraceEvent {
                    path: path_of(e.path, e.path_hex)?,
                    access: e.access,
                })
            })
            .collect::<Result<Vec<_>, FsError>>()?;
        let reads = f
            .reads
            .into_iter()
            .map(|r| {
                if r.offset.checked_add(r.len).is_none() {
                    return Err(bad("read range past 2^64".into()));
                }
                Ok(TraceRead {
                    path: path_of(r.path, r.path_hex)?,
                    offset: r.offset,
                    len: r.len,
                })
            })
            .collect::<Result<Vec<_>, FsError>>()?;
        Ok((events, reads))
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
    fn contiguous_reads_of_a_file_merge_in_order() {
        let t = Trace::new();
        t.record_read(b"a", 0, 4096);
        t.record_read(b"a", 4096, 4096);
        t.record_read(b"b", 0, 10);
        t.record_read(b"a", 65536, 4096);
        t.record_read(b"a", 0, 0);
        let r = t.reads();
        let got: Vec<_> = r.iter().map(|r| (&r.path[..], r.offset, r.len)).collect();
        assert_eq!(
            got,
            vec![
                (&b"a"[..], 0, 8192),
                (&b"b"[..], 0, 10),
                (&b"a"[..], 65536, 4096)
            ]
        );
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
        let reads = vec![
            TraceRead {
                path: b"usr/bin/x".to_vec(),
                offset: 4096,
                len: 8192,
            },
            TraceRead {
                path: vec![b'a', 0xff, b'b'],
                offset: 0,
                len: 1,
            },
        ];
        TraceFile::from_events(&events)
            .with_reads(&reads)
            .write(&p)
            .unwrap();
        assert_eq!(TraceFile::read_all(&p).unwrap(), (events.clone(), reads));
        // Traces written before reads were recorded still load.
        TraceFile::from_events(&events).write(&p).unwrap();
        assert_eq!(TraceFile::read_all(&p).unwrap(), (events, vec![]));
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

//! Advisory file locks (flock) shared between lazylayer processes.

use std::fs::File;
use std::path::Path;

use lazylayer_sys::IoError;
use rustix::fs::{flock, FlockOperation};

use crate::StoreError;

/// Held while alive; the kernel drops the lock when the file closes, so a
/// crashed process never leaves a stale lock behind.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    fn take(path: &Path, op: FlockOperation) -> Result<FileLock, StoreError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(IoError::on("opening lock", path))?;
        flock(&file, op).map_err(|e| IoError::on("taking lock", path)(e.into()))?;
        Ok(FileLock { _file: file })
    }

    /// Blocks until no other holder remains.
    pub fn exclusive(path: &Path) -> Result<FileLock, StoreError> {
        Self::take(path, FlockOperation::LockExclusive)
    }

    /// Without waiting: None when another holder has it.
    pub fn try_exclusive(path: &Path) -> Result<Option<FileLock>, StoreError> {
        match Self::take(path, FlockOperation::NonBlockingLockExclusive) {
            Ok(l) => Ok(Some(l)),
            Err(StoreError::Io(IoError { source, .. }))
                if source.kind() == std::io::ErrorKind::WouldBlock =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn shared(path: &Path) -> Result<FileLock, StoreError> {
        Self::take(path, FlockOperation::LockShared)
    }

    /// Async wrappers: flock blocks the thread, so it runs on the blocking pool.
    pub async fn exclusive_async(path: &Path) -> Result<FileLock, StoreError> {
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::exclusive(&p))
            .await
            .map_err(|e| StoreError::Worker {
                what: "lock".into(),
                reason: e.to_string(),
            })?
    }

    pub async fn shared_async(path: &Path) -> Result<FileLock, StoreError> {
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::shared(&p))
            .await
            .map_err(|e| StoreError::Worker {
                what: "lock".into(),
                reason: e.to_string(),
            })?
    }
}

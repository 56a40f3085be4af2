//! Containers that `lazylayer run` started, as directories under
//! `<root>/containers/<name>/`: `state.json` (what `ps` shows), `status.json`
//! (per-layer fetch progress, for `status`), the bundle, and the overlay's
//! upper and work dirs. A container directory is the unit `rm` removes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::RuntimeError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    Running,
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    pub name: String,
    pub image: String,
    /// Unix seconds.
    pub created: u64,
    pub status: ContainerStatus,
    pub exit_code: Option<i32>,
    /// The `lazylayer run` process serving the container's file system.
    pub pid: u32,
    /// Whether the root is served lazily (else: plain overlayfs over a full pull).
    pub lazy: bool,
}

/// A container's directory.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    pub path: PathBuf,
}

fn io(action: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let p = p.to_path_buf();
    move |source| RuntimeError::Io {
        action,
        path: p,
        source,
    }
}

impl ContainerDir {
    pub fn base(root: &Path) -> PathBuf {
        root.join("containers")
    }

    /// Create the directory of a new container; fails if the name is taken.
    pub fn create(root: &Path, name: &str) -> Result<ContainerDir, RuntimeError> {
        crate::validate_id(name)?;
        let base = Self::base(root);
        std::fs::create_dir_all(&base).map_err(io("creating", &base))?;
        let path = base.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => Ok(ContainerDir { path }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(RuntimeError::Config {
                id: name.to_string(),
                reason: format!("a container named {name} exists already (remove it with `lazylayer rm {name}`)"),
            }),
            Err(e) => Err(io("creating", &path)(e)),
        }
    }

    pub fn open(root: &Path, name: &str) -> Result<ContainerDir, RuntimeError> {
        crate::validate_id(name)?;
        let path = Self::base(root).join(name);
        if !path.is_dir() {
            return Err(RuntimeError::Config {
                id: name.to_string(),
                reason: "no such container".into(),
            });
        }
        Ok(ContainerDir { path })
    }

    pub fn list(root: &Path) -> Result<Vec<ContainerState>, RuntimeError> {
        let base = Self::base(root);
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&base) else {
            return Ok(out);
        };
        for e in rd.flatten() {
            let d = ContainerDir { path: e.path() };
            if let Ok(s) = d.read_state() {
                out.push(s.refreshed());
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    pub fn sub(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn write_json(&self, file: &str, v: &impl Serialize) -> Result<(), RuntimeError> {
        let tmp = self.path.join(format!(".{file}.tmp"));
        let dest = self.path.join(file);
        std::fs::write(&tmp, serde_json::to_vec_pretty(v).expect("serialisable"))
            .map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &dest).map_err(io("writing", &dest))
    }

    pub fn write_state(&self, s: &ContainerState) -> Result<(), RuntimeError> {
        self.write_json("state.json", s)
    }

    pub fn read_state(&self) -> Result<ContainerState, RuntimeError> {
        let p = self.path.join("state.json");
        let b = std::fs::read(&p).map_err(io("reading", &p))?;
        serde_json::from_slice(&b).map_err(|e| io("parsing", &p)(std::io::Error::other(e)))
    }

    /// Per-layer progress, written by the serving process.
    pub fn write_status(&self, v: &impl Serialize) -> Result<(), RuntimeError> {
        self.write_json("status.json", v)
    }

    pub fn read_status(&self) -> Result<serde_json::Value, RuntimeError> {
        let p = self.path.join("status.json");
        let b = std::fs::read(&p).map_err(io("reading", &p))?;
        serde_json::from_slice(&b).map_err(|e| io("parsing", &p)(std::io::Error::other(e)))
    }

    /// Remove the container: kill what may still run (a serving process that
    /// crashed leaves the container and its mounts behind), unmount every
    /// mount below the directory, delete runc's state, remove the directory.
    pub fn remove(self, runc: &crate::Runc, force: bool) -> Result<(), RuntimeError> {
        let state = self.read_state().ok().map(|s| s.refreshed());
        if let Some(s) = &state {
            if s.status == ContainerStatus::Running && !force {
                return Err(RuntimeError::Config {
                    id: s.name.clone(),
                    reason: "the container is running (stop it, or use --force)".into(),
                });
            }
            let _ = std::process::Command::new(&runc.binary)
                .arg("--root")
                .arg(&runc.root)
                .args(["delete", "--force", &s.name])
                .output();
        }
        crate::unmount_below(&self.path);
        std::fs::remove_dir_all(&self.path).map_err(io("removing", &self.path))
    }
}

impl ContainerState {
    /// A "running" record whose serving process is gone is really exited.
    pub fn refreshed(mut self) -> ContainerState {
        if self.status == ContainerStatus::Running
            && !Path::new(&format!("/proc/{}", self.pid)).exists()
        {
            self.status = ContainerStatus::Exited;
        }
        self
    }
}

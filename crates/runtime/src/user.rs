//! `User` strings resolved against the image's own /etc/passwd and /etc/group, with the
//! rules of runc's libcontainer/user (which docker and podman share).

use std::io::Read;
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::RuntimeError;

/// The numeric identity the container's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub home: String,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Resolves `user` ("", "uid", "uid:gid", "name", "name:group", "uid:group") for the
/// container `id` whose root file system is `rootfs`.
pub(crate) fn resolve_user(
    id: &str,
    rootfs: &Path,
    user: &str,
) -> Result<ResolvedUser, RuntimeError> {
    let err = |reason: String| RuntimeError::User {
        id: id.to_owned(),
        user: user.to_owned(),
        reason,
    };
    let (user_arg, group_arg) = match user.split_once(':') {
        Some((u, g)) => (u, g),
        None => (user, ""),
    };
    let uid_num = parse_id(user_arg);
    let gid_num = parse_id(group_arg);
    if !user_arg.is_empty() && uid_num.is_none() && user_arg.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(format!("uid {user_arg} is out of range")));
    }

    let passwd = parse_passwd(&read_in_rootfs(rootfs, "etc/passwd")?);
    // An empty user means root, as in docker; a numeric one is always a uid, never a name.
    let matched = passwd.into_iter().find(|p| match (user_arg, uid_num) {
        ("", _) => p.uid == 0,
        (_, Some(uid)) => p.uid == uid,
        (name, None) => p.name == name,
    });
    let mut resolved = match (&matched, uid_num) {
        (Some(p), _) => ResolvedUser {
            uid: p.uid,
            gid: p.gid,
            additional_gids: Vec::new(),
            home: p.home.clone(),
        },
        (None, Some(uid)) => ResolvedUser {
            uid,
            gid: 0,
            additional_gids: Vec::new(),
            home: "/".to_owned(),
        },
        (None, None) if user_arg.is_empty() => ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            home: "/".to_owned(),
        },
        (None, None) => {
            return Err(err(format!(
                "no user named {user_arg:?} in the image's /etc/passwd"
            )))
        }
    };

    if group_arg.is_empty() && matched.is_none() {
        return Ok(resolved);
    }
    let groups = parse_group(&read_in_rootfs(rootfs, "etc/group")?);
    if group_arg.is_empty() {
        // Supplementary groups come only from membership of a user found by name, and
        // only in the implicit form: an explicit group replaces them, as in runc.
        let name = matched
            .as_ref()
            .map(|p| p.name.as_str())
            .unwrap_or_default();
        for g in groups
            .iter()
            .filter(|g| g.members.iter().any(|m| m == name))
        {
            if !resolved.additional_gids.contains(&g.gid) {
                resolved.additional_gids.push(g.gid);
            }
        }
    } else {
        let found = groups.iter().find(|g| match gid_num {
            Some(gid) => g.gid == gid,
            None => g.name == group_arg,
        });
        resolved.gid = match (found, gid_num) {
            (Some(g), _) => g.gid,
            (None, Some(gid)) => gid,
            (None, None) => {
                return Err(err(format!(
                    "no group named {group_arg:?} in the image's /etc/group"
                )))
            }
        };
    }
    Ok(resolved)
}

/// A decimal id; None for anything else (names, empty, out of range).
fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Reads `rel` from inside `rootfs`, resolving every symlink as if `rootfs` were `/`,
/// so an absolute link such as /etc/passwd -> /host/etc/passwd can never reach the
/// host's files. A missing file reads as empty: images without /etc/passwd exist and
/// still run with numeric users.
fn read_in_rootfs(rootfs: &Path, rel: &str) -> Result<String, RuntimeError> {
    let path = rootfs.join(rel);
    let root = rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RuntimeError::io("open rootfs", rootfs, e.into()))?;
    let fd = match rustix::fs::openat2(
        &root,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(String::new()),
        Err(e) => return Err(RuntimeError::io("open", path, e.into())),
    };
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .read_to_end(&mut bytes)
        .map_err(|e| RuntimeError::io("read", &path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Lines that do not parse are skipped, as libc and runc do.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f
                    .get(5)
                    .filter(|h| !h.is_empty())
                    .unwrap_or(&"/")
                    .to_string(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|m| !m.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n# comment\napp:x:1000:1000::/home/app:/bin/sh\nbroken line\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nwheel:x:10:root\n",
        )
        .unwrap();
        dir
    }

    fn resolve(dir: &Path, user: &str) -> Result<ResolvedUser, RuntimeError> {
        resolve_user("c1", dir, user)
    }

    #[test]
    fn name_gets_primary_gid_home_and_memberships() {
        let dir = rootfs();
        let u = resolve(dir.path(), "app").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![2000]);
        assert_eq!(u.home, "/home/app");
        // Empty user is root, with root's memberships.
        let r = resolve(dir.path(), "").unwrap();
        assert_eq!((r.uid, r.gid, r.additional_gids), (0, 0, vec![10]));
    }

    #[test]
    fn numeric_forms() {
        let dir = rootfs();
        // A known uid takes its passwd gid and memberships.
        let u = resolve(dir.path(), "1000").unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids), (1000, 1000, vec![2000]));
        // An unknown uid is allowed, with gid 0.
        let u = resolve(dir.path(), "4242").unwrap();
        assert_eq!((u.uid, u.gid), (4242, 0));
        assert!(u.additional_gids.is_empty());
        let u = resolve(dir.path(), "4242:77").unwrap();
        assert_eq!((u.uid, u.gid), (4242, 77));
    }

    #[test]
    fn explicit_group_replaces_memberships() {
        let dir = rootfs();
        let u = resolve(dir.path(), "app:extra").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 2000));
        assert!(u.additional_gids.is_empty());
        let u = resolve(dir.path(), "1000:extra").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 2000));
    }

    #[test]
    fn unknown_names_are_clear_errors() {
        let dir = rootfs();
        let e = resolve(dir.path(), "nobody").unwrap_err().to_string();
        assert!(
            e.contains("c1") && e.contains("\"nobody\"") && e.contains("/etc/passwd"),
            "{e}"
        );
        let e = resolve(dir.path(), "app:nogroup").unwrap_err().to_string();
        assert!(e.contains("\"nogroup\"") && e.contains("/etc/group"), "{e}");
        let e = resolve(dir.path(), "99999999999").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn absolute_symlink_stays_inside_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), "evil:x:0:0::/:/bin/sh\n").unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        // Points at a real host file; inside the rootfs that path does not exist.
        std::os::unix::fs::symlink(outside.path().join("passwd"), dir.path().join("etc/passwd"))
            .unwrap();
        let e = resolve(dir.path(), "evil").unwrap_err().to_string();
        assert!(e.contains("no user named"), "{e}");
        // A relative link within the rootfs is followed.
        let dir2 = rootfs();
        std::fs::rename(
            dir2.path().join("etc/passwd"),
            dir2.path().join("etc/passwd.real"),
        )
        .unwrap();
        std::os::unix::fs::symlink("../etc/passwd.real", dir2.path().join("etc/passwd")).unwrap();
        assert_eq!(resolve(dir2.path(), "app").unwrap().uid, 1000);
    }
}

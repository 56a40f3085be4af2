//! A unix socket only its owner may use: whoever speaks to lazylayer's
//! sockets drives mounts, or hands over registry credentials.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::error::IoError;

/// Listen on `path` (its directory created, a socket file left by a
/// previous run replaced), mode `0600`, non-blocking (for an async
/// runtime's `from_std`).
pub fn listen_private(path: &Path) -> Result<UnixListener, IoError> {
    let err = |what: &str, p: &Path| {
        let (what, p) = (what.to_string(), p.to_path_buf());
        move |source| IoError {
            what,
            path: p,
            source,
        }
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err("creating the socket's directory", d))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(err("removing the old socket", path)(e))
        }
        _ => {}
    }
    let l = UnixListener::bind(path).map_err(err("listening on the socket", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(err("making the socket private", path))?;
    l.set_nonblocking(true)
        .map_err(err("making the socket non-blocking", path))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_private_and_replaces_a_stale_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/x.sock");
        drop(listen_private(&p).unwrap());
        // The file of the first is still there: the second replaces it.
        let l = listen_private(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::os::unix::net::UnixStream::connect(&p).unwrap();
        assert!(l.accept().is_ok());
    }
}

//! `/proc/self/mountinfo`, parsed once for everyone: the mount points a
//! runtime unmounts, the mounts a holder keeps, the layers the store must
//! not evict and the overlays Podman's layers stand under.
//!
//! The kernel writes space, tab, newline and backslash in paths (and in
//! option values) as `\ooo`; every path and option here has them undone,
//! so a path with a space is found like any other.

/// One line of mountinfo (proc(5)), its paths and options unescaped.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mount {
    /// `major:minor` of the file system (field 3).
    pub device: String,
    /// The directory of that file system this mount shows (field 4): a bind
    /// mount's source, as a path inside its file system.
    pub root: String,
    /// Where it is mounted (field 5).
    pub mount_point: String,
    /// The file-system type after the ` - ` separator (`overlay`,
    /// `fuse.lazylayer`); empty on a line without one.
    pub fs_type: String,
    /// The mount source after the type; empty on a line without one.
    pub source: String,
    /// The super-block options (`lowerdir=/a:/b`), split at commas before
    /// they are unescaped (an escaped comma stays inside its option).
    pub super_options: Vec<String>,
}

/// The mounts of `text` (mountinfo's format), in mount order: a mount
/// stacked on another comes after it. A line with fewer than five fields
/// is skipped; no input makes this panic.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// The mounts of this process's mount namespace; none when mountinfo
/// cannot be read (no /proc).
pub fn read() -> Vec<Mount> {
    parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// Every mount point of this mount namespace, in mount order.
pub fn mount_points() -> Vec<String> {
    read().into_iter().map(|m| m.mount_point).collect()
}

/// True when `path` (as given, not canonicalized) is a mount point in this
/// mount namespace.
pub fn is_mount_point(path: &std::path::Path) -> bool {
    let p = path.to_string_lossy();
    mount_points().iter().any(|m| *m == p)
}

fn parse_line(line: &str) -> Option<Mount> {
    let (fields, fs) = match line.split_once(" - ") {
        Some((fields, fs)) => (fields, Some(fs)),
        None => (line, None),
    };
    let mut f = fields.split(' ');
    let device = f.nth(2)?;
    let root = f.next()?;
    let mount_point = f.next()?;
    let mut fs = fs.unwrap_or("").split(' ');
    let fs_type = fs.next().unwrap_or("");
    let source = fs.next().unwrap_or("");
    let super_options = fs
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|o| !o.is_empty())
        .map(unescape)
        .collect();
    Some(Mount {
        device: device.to_string(),
        root: unescape(root),
        mount_point: unescape(mount_point),
        fs_type: unescape(fs_type),
        source: unescape(source),
        super_options,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // In u32, and only a byte's worth: `\777` is text, not an escape
        // (issue #19: the u8 arithmetic overflowed).
        let escaped = b
            .get(i + 1..i + 4)
            .filter(|oct| b[i] == b'\\' && oct.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|oct| {
                u8::try_from(oct.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'))).ok()
            });
        if let Some(v) = escaped {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    /// Issue #19: three octal digits above 0o377 are no escape the kernel
    /// writes; the byte arithmetic overflowed on them ("attempt to multiply
    /// with overflow").
    #[test]
    fn octal_beyond_a_byte_is_kept_as_text() {
        assert_eq!(unescape(r"/a\777\040b"), r"/a\777 b");
        assert_eq!(unescape(r"/a\400"), r"/a\400");
        assert_eq!(unescape(r"/a\377"), "/a\u{fffd}");
        let info = "36 22 0:46 / /s/x\\777\\040y rw - tmpfs tmpfs rw\n";
        assert_eq!(parse(info)[0].mount_point, "/s/x\\777 y");
    }

    /// Every field lands where proc(5) puts it, optional fields (`shared:1`)
    /// or not; an overlay's lower directory with a space is one option.
    #[test]
    fn fields_are_read_around_the_optional_ones() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
41 22 8:17 /layers/sha256/ab/fs /mnt/a\\040view ro master:3 propagate_from:2 - ext4 /dev/sdb1 rw
50 22 0:50 / /run/c/rootfs rw - overlay overlay rw,lowerdir=/s/a\\040b:/s/c,upperdir=/u\\054v
";
        let m = parse(info);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            Mount {
                device: "8:1".into(),
                root: "/".into(),
                mount_point: "/".into(),
                fs_type: "ext4".into(),
                source: "/dev/sda1".into(),
                super_options: vec!["rw".into(), "errors=remount-ro".into()],
            }
        );
        assert_eq!(m[1].root, "/layers/sha256/ab/fs");
        assert_eq!(m[1].mount_point, "/mnt/a view");
        assert_eq!(
            (m[1].fs_type.as_str(), m[1].device.as_str()),
            ("ext4", "8:17")
        );
        assert_eq!(m[2].fs_type, "overlay");
        assert_eq!(
            m[2].super_options,
            ["rw", "lowerdir=/s/a b:/s/c", "upperdir=/u,v"]
        );
    }

    /// A line too short for a mount point is skipped; one without the
    /// ` - ` separator still gives its mount point.
    #[test]
    fn short_and_truncated_lines() {
        let m = parse("22 1 0:21 /\n\n30 22 0:40 / /s/a rw\n");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, "/s/a");
        assert!(m[0].fs_type.is_empty() && m[0].super_options.is_empty());
    }

    #[test]
    fn fuzz_mountinfo_unescape() {
        use lazylayer_testsupport::fuzz::fuzz;
        use proptest::prelude::*;
        let piece = proptest::sample::select(vec![
            "\\", "\\040", "\\777", "\\0", "\\04", "0", "7", "8", "/a", " ", "é",
        ]);
        let text = prop_oneof![
            3 => proptest::collection::vec(piece, 0..24).prop_map(|p| p.concat()),
            1 => any::<String>(),
        ];
        fuzz("mountinfo (unescape)", text, |t| {
            // Never longer: an escape is four bytes for one.
            prop_assert!(unescape(&t).len() <= t.len() * 3);
            Ok(())
        });
    }

    /// Any text, however broken, gives mounts or nothing, never a panic;
    /// a mount point found is never longer than its line.
    #[test]
    fn fuzz_mountinfo_lines() {
        use lazylayer_testsupport::fuzz::fuzz;
        use proptest::prelude::*;
        let piece = proptest::sample::select(vec![
            " ",
            "\\",
            "\\040",
            "\\777",
            "\\0",
            "7",
            "/s",
            "/s/a",
            "/",
            "-",
            " - ",
            "\n",
            ",",
            "é",
            "22 1 0:21 ",
            "overlay",
            "lowerdir=/s/a:/s/b",
        ]);
        let text = prop_oneof![
            3 => proptest::collection::vec(piece, 0..24).prop_map(|p| p.concat()),
            1 => any::<String>(),
        ];
        fuzz("mountinfo (parse)", text, |t| {
            let longest = t.lines().map(|l| l.len()).max().unwrap_or(0);
            for m in parse(&t) {
                prop_assert!(m.mount_point.len() <= longest * 3, "{:?}", m);
            }
            Ok(())
        });
    }
}

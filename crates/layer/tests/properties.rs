//! Property tests for the path rule and for confinement of random archives.

mod common;

use std::path::Path;

use common::*;
use lazylayer_layer::*;
use proptest::prelude::*;
use tar::EntryType;

fn component() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "bc", ".wh.x", ".", "..", ""])
}

proptest! {
    /// A path is accepted iff it is non-empty, not absolute and has no `..`;
    /// the accepted form is the list of its normal components.
    #[test]
    fn normalize_accepts_exactly_the_safe_paths(
        comps in prop::collection::vec(component(), 0..7),
        absolute in any::<bool>(),
    ) {
        let joined = comps.join("/");
        let raw = if absolute { format!("/{joined}") } else { joined };
        let unsafe_path = raw.is_empty() || raw.starts_with('/') || comps.contains(&"..");
        match normalize(raw.as_bytes()) {
            Ok(p) => {
                prop_assert!(!unsafe_path, "accepted {raw:?}");
                let s = p.to_str().unwrap();
                let want: Vec<&str> = comps.iter().copied().filter(|c| !c.is_empty() && *c != ".").collect();
                prop_assert_eq!(s, want.join("/"));
                if !s.is_empty() {
                    prop_assert!(s.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
                }
            }
            Err(e) => {
                prop_assert!(unsafe_path, "refused {raw:?}: {e}");
                let specific = match e {
                    LayerError::EmptyPath { .. } => raw.is_empty(),
                    LayerError::AbsolutePath { .. } => raw.starts_with('/'),
                    LayerError::ParentComponent { .. } => comps.contains(&".."),
                    _ => false,
                };
                prop_assert!(specific, "wrong error for {raw:?}: {e}");
            }
        }
    }
}

/// One random, possibly hostile, archive member.
#[derive(Debug, Clone)]
enum Member {
    File(String),
    Dir(String),
    Symlink(String, String),
    Hardlink(String, String),
    Fifo(String),
}

/// Paths that mix names with `..`, `.`, absolute prefixes and whiteout names;
/// the names are unusual enough that finding one outside the sandbox would
/// mean this code put it there. Weighted towards few distinct names so that
/// "symlink X, then write X/Y" sequences come up often.
fn member_path() -> impl Strategy<Value = String> {
    let comp = prop_oneof![
        6 => Just("lzlt_a"),
        3 => Just("lzlt_b"),
        2 => Just(".."),
        1 => Just("."),
        1 => Just(""),
        1 => Just(".wh.lzlt_a"),
        1 => Just(".wh..wh..opq"),
        1 => Just(".wh..wh.idx"),
    ];
    (prop::collection::vec(comp, 1..4), prop::bool::weighted(0.1)).prop_map(|(c, abs)| {
        let j = c.join("/");
        if abs {
            format!("/{j}")
        } else {
            j
        }
    })
}

/// Symlink and hardlink targets aimed at the outside: relative escapes, the
/// file-system root, and (as `@OUT`, filled in per case) the sandbox's
/// outside dir.
fn link_target() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["..", "../..", "/", "@OUT", "@OUT/secret", "lzlt_a", "../outside", "../outside/secret", "."])
            .prop_map(str::to_owned),
        1 => member_path(),
    ]
}

fn member() -> impl Strategy<Value = Member> {
    prop_oneof![
        member_path().prop_map(Member::File),
        member_path().prop_map(Member::Dir),
        (member_path(), link_target()).prop_map(|(p, t)| Member::Symlink(p, t)),
        (member_path(), link_target()).prop_map(|(p, t)| Member::Hardlink(p, t)),
        member_path().prop_map(Member::Fifo),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Whatever the archive, extraction (successful or not) creates, changes
    /// or links nothing outside the root.
    #[test]
    fn extraction_never_escapes_the_root(members in prop::collection::vec(member(), 1..10)) {
        let sb = Sandbox::new();
        let out = sb.outside_str();
        let fill = |s: &str| s.replace("@OUT", &out);
        let mut t = RawTar::new();
        let mut storage: Vec<(String, String)> = Vec::new();
        for m in &members {
            match m {
                Member::File(p) | Member::Dir(p) | Member::Fifo(p) => storage.push((p.clone(), String::new())),
                Member::Symlink(p, l) | Member::Hardlink(p, l) => storage.push((p.clone(), fill(l))),
            }
        }
        for (m, (p, l)) in members.iter().zip(&storage) {
            if p.len() > 100 || l.len() > 100 {
                continue;
            }
            let e = match m {
                Member::File(_) => Raw::file(p.as_bytes(), b"payload"),
                Member::Dir(_) => Raw::dir(p.as_bytes()),
                Member::Fifo(_) => Raw::new(p.as_bytes(), EntryType::Fifo),
                Member::Symlink(..) => Raw::symlink(p.as_bytes(), l.as_bytes()),
                Member::Hardlink(..) => Raw::hardlink(p.as_bytes(), l.as_bytes()),
            };
            t.add(e);
        }
        let tar = t.finish();
        let opts = ExtractOptions { chown: false, ..Default::default() };
        let _ = extract(&tar[..], &sb.root, &opts, &mut |_| {});
        sb.assert_outside_untouched();
        let parent = sb.dir.path().parent().unwrap();
        for name in ["lzlt_a", "lzlt_b", ".wh.lzlt_a"] {
            prop_assert!(!Path::new("/").join(name).exists(), "/{name} created");
            prop_assert!(!parent.join(name).exists(), "{name} created next to the sandbox");
        }
    }
}

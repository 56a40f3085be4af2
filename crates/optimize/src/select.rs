//! Which entries go into the boot layer, and in what order.

use std::collections::HashSet;

use lazylayer_fs::{Access, TraceEvent};
use lazylayer_index::{BootIndex, FileKind};

/// Pick the boot layer's entries from a trace, in first-access order:
/// - files whose content was opened (their bytes are what a start needs);
/// - symlinks, directories, devices and fifos that were looked up, listed or
///   read (metadata-only entries cost a tar header each);
/// - every ancestor directory of those, before it, so the layer applies
///   cleanly with any runtime;
/// - whole hardlink groups: copying one name of a group would change `nlink`
///   under a runtime that applies all layers.
///
/// A regular file that was only stat'ed is left out: the index answers stat.
pub fn select_boot_entries(index: &BootIndex, events: &[TraceEvent]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for ev in events {
        let Some(idx) = index.lookup(&ev.path) else {
            continue;
        };
        let e = &index.entries[idx as usize];
        let wanted = match (ev.access, e.kind) {
            (Access::Missing, _) => false,
            (Access::Open, FileKind::File) => true,
            (_, FileKind::File) => false,
            _ => true,
        };
        if !wanted {
            continue;
        }
        let members: Vec<u32> = if e.kind == FileKind::File && e.hardlink_group != 0 {
            index.hardlink_members(e.hardlink_group).to_vec()
        } else {
            vec![idx]
        };
        for m in members {
            include_with_ancestors(index, m, &mut seen, &mut out);
        }
    }
    out
}

fn include_with_ancestors(
    index: &BootIndex,
    idx: u32,
    seen: &mut HashSet<u32>,
    out: &mut Vec<u32>,
) {
    if idx == 0 || seen.contains(&idx) {
        return;
    }
    let mut chain = vec![idx];
    let mut p = index.entries[idx as usize].parent;
    while p != 0 && !seen.contains(&p) {
        chain.push(p);
        p = index.entries[p as usize].parent;
    }
    for i in chain.into_iter().rev() {
        seen.insert(i);
        out.push(i);
    }
}

#[cfg(test)]
mod tests;

//! The names of a data view ([`crate::meta_tree`]): `/<layer hex>/fs/<path>`.
//!
//! Files keep their inode numbers (so opens and reads are the root view's);
//! the directories on the way get numbers past the index's: one per top
//! directory, then one per (top directory, index directory) pair.

use fuser::{FileAttr, FileType, Generation, INodeNo, ReplyEntry};
use lazylayer_index::FileKind;

use super::Shared;
use crate::meta_tree::DataView;
use crate::source::ContentSource;

/// A data view's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataDir {
    /// `/<hex>` of top directory `r`.
    Top(u32),
    /// `/<hex>/fs/<dir's path>` of top directory `r` and index directory `d`.
    Dir { r: u32, d: u32 },
}

impl<S: ContentSource> Shared<S> {
    fn data_base(&self) -> u64 {
        self.index.len() as u64 + 1
    }

    fn data_ino(&self, view: &DataView, dir: DataDir) -> INodeNo {
        let n = self.index.len() as u64;
        INodeNo(match dir {
            DataDir::Top(r) => self.data_base() + u64::from(r),
            DataDir::Dir { r, d } => {
                self.data_base() + view.len() as u64 + u64::from(r) * n + u64::from(d)
            }
        })
    }

    fn data_dir(&self, view: &DataView, ino: INodeNo) -> Option<DataDir> {
        let n = self.index.len() as u64;
        let tops = view.len() as u64;
        let k = ino.0.checked_sub(self.data_base())?;
        if k < tops {
            return Some(DataDir::Top(k as u32));
        }
        let k = k - tops;
        let (r, d) = (k / n, k % n);
        (r < tops).then_some(DataDir::Dir {
            r: r as u32,
            d: d as u32,
        })
    }

    /// Attributes of a data view's directory (none outside one).
    pub(super) fn data_dir_attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let view = self.opts.data_view.as_ref()?;
        self.data_dir(view, ino)?;
        Some(self.dir_attr(ino))
    }

    /// A data view directory's attributes. Only the daemon's own mount sees
    /// them: owner root, mode 0555.
    fn dir_attr(&self, ino: INodeNo) -> FileAttr {
        let mut a = self.attr(0);
        a.ino = ino;
        a.kind = FileType::Directory;
        a.perm = 0o555;
        a.uid = 0;
        a.gid = 0;
        a.nlink = 2;
        a
    }

    /// LOOKUP in a data view: `<hex>` at the top, then `fs`, then the
    /// image's directories and the files the top directory's layer holds.
    pub(super) fn lookup_data(
        &self,
        view: &DataView,
        parent: INodeNo,
        name: &[u8],
        reply: ReplyEntry,
    ) {
        let ttl = self.opts.ttl;
        let found = if parent == INodeNo(1) {
            view.root_named(name).map(DataDir::Top)
        } else {
            match self.data_dir(view, parent) {
                Some(DataDir::Top(r)) if name == b"fs" => Some(DataDir::Dir { r, d: 0 }),
                Some(DataDir::Dir { r, d }) => match self.index.lookup_child(d, name) {
                    Some(c) if self.entry(c).kind == FileKind::Dir => {
                        Some(DataDir::Dir { r, d: c })
                    }
                    Some(c)
                        if self.entry(c).kind == FileKind::File && view.holds(r, self.entry(c)) =>
                    {
                        // The root view's inode (the canonical one of a
                        // hardlink group): opens and reads are the same.
                        return reply.entry(&ttl, &self.attr(c), Generation(0));
                    }
                    _ => None,
                },
                _ => None,
            }
        };
        match found {
            Some(dir) => reply.entry(
                &ttl,
                &self.dir_attr(self.data_ino(view, dir)),
                Generation(0),
            ),
            None => self.reply_missing(0, reply),
        }
    }
}

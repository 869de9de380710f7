//! Comparing two trees entry by entry: paths, types, modes, owners, xattrs,
//! link targets, device numbers and file contents. This is how images are
//! verified against what they should contain.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Mutex;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::tree::{FileContent, Kind, Node, display_path};

/// What to compare besides structure and contents.
#[derive(Debug, Clone, Copy, Default)]
pub struct CompareOptions {
    pub mtime: bool,
    /// Skip the roots' own metadata (mode, owner, times, xattrs).
    pub ignore_root_meta: bool,
    /// Compare only names, types, link targets and contents (files on a
    /// FAT boot partition have no modes or owners).
    pub contents_only: bool,
}

/// One difference, with the path it was found at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub path: String,
    pub what: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.what)
    }
}

/// Digests of one tree's file contents by path, kept from one comparison
/// to the next with the same tree: a coordinator verifies every kit of a
/// release against the same new image, whose files then need hashing once.
#[derive(Debug, Default)]
pub struct ContentDigests {
    by_path: Mutex<HashMap<Vec<u8>, [u8; 32]>>,
}

impl ContentDigests {
    /// Files whose digest is kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, [u8; 32]>> {
        self.by_path.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hash(&self, path: &[u8], f: &FileContent) -> Result<[u8; 32]> {
        if let Some(d) = self.lock().get(path) {
            return Ok(*d);
        }
        let d = hash(f)?;
        self.lock().insert(path.to_vec(), d);
        Ok(d)
    }
}

/// Lists every difference between `a` and `b` (empty when equal), in path
/// order. File contents are hashed in parallel.
pub fn compare_trees(a: &Node, b: &Node, opts: CompareOptions) -> Result<Vec<Difference>> {
    compare_trees_with(a, b, opts, None)
}

/// [`compare_trees`], taking `b`'s file digests from `b_digests` and
/// keeping there those it computes. The caller vouches that `b_digests`
/// only ever holds digests of this very `b`.
pub fn compare_trees_with(
    a: &Node,
    b: &Node,
    opts: CompareOptions,
    b_digests: Option<&ContentDigests>,
) -> Result<Vec<Difference>> {
    let mut out = Vec::new();
    let mut files: Vec<(Vec<u8>, &FileContent, &FileContent)> = Vec::new();
    walk(a, b, &mut Vec::new(), opts, true, &mut out, &mut files);
    let content: Vec<Result<Option<Difference>>> = files
        .par_iter()
        .map(|(path, fa, fb)| {
            if fa.size != fb.size {
                return Ok(Some(Difference {
                    path: display_path(path),
                    what: format!("size {} != {}", fa.size, fb.size),
                }));
            }
            let hb = match b_digests {
                Some(memo) => memo.hash(path, fb)?,
                None => hash(fb)?,
            };
            let ha = hash(fa)?;
            Ok((ha != hb).then(|| Difference {
                path: display_path(path),
                what: "contents differ".into(),
            }))
        })
        .collect();
    for c in content {
        out.extend(c?);
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

/// SHA-256 of a file's contents.
pub fn hash(f: &FileContent) -> Result<[u8; 32]> {
    let mut r = f.open()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| crate::Error::io(f.describe(), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Dir(_) => "directory",
        Kind::File(_) => "file",
        Kind::Symlink(_) => "symlink",
        Kind::BlockDev(_) => "block device",
        Kind::CharDev(_) => "character device",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
    }
}

fn walk<'a>(
    a: &'a Node,
    b: &'a Node,
    path: &mut Vec<u8>,
    opts: CompareOptions,
    root: bool,
    out: &mut Vec<Difference>,
    files: &mut Vec<(Vec<u8>, &'a FileContent, &'a FileContent)>,
) {
    let mut diff = |what: String| {
        out.push(Difference {
            path: display_path(path),
            what,
        })
    };
    if !(opts.contents_only || root && opts.ignore_root_meta) {
        let (ma, mb) = (&a.meta, &b.meta);
        if ma.mode != mb.mode {
            diff(format!("mode {:04o} != {:04o}", ma.mode, mb.mode));
        }
        if (ma.uid, ma.gid) != (mb.uid, mb.gid) {
            diff(format!(
                "owner {}:{} != {}:{}",
                ma.uid, ma.gid, mb.uid, mb.gid
            ));
        }
        if opts.mtime && ma.mtime != mb.mtime {
            diff(format!("mtime {} != {}", ma.mtime, mb.mtime));
        }
        let xa: BTreeMap<_, _> = ma.xattrs.iter().cloned().collect();
        let xb: BTreeMap<_, _> = mb.xattrs.iter().cloned().collect();
        if xa != xb {
            let keys = |m: &BTreeMap<Vec<u8>, Vec<u8>>| {
                m.keys()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            diff(format!("xattrs [{}] != [{}]", keys(&xa), keys(&xb)));
        }
    }
    match (&a.kind, &b.kind) {
        (Kind::Dir(ca), Kind::Dir(cb)) => {
            let mut ia = ca.iter().peekable();
            let mut ib = cb.iter().peekable();
            loop {
                let ord = match (ia.peek(), ib.peek()) {
                    (None, None) => break,
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (Some(x), Some(y)) => x.name.cmp(&y.name),
                };
                let len = path.len();
                let push = |path: &mut Vec<u8>, name: &[u8]| {
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(name);
                };
                match ord {
                    std::cmp::Ordering::Less => {
                        let x = ia.next().unwrap();
                        push(path, &x.name);
                        out.push(Difference {
                            path: display_path(path),
                            what: format!("only in the first ({})", kind_name(&x.kind)),
                        });
                    }
                    std::cmp::Ordering::Greater => {
                        let y = ib.next().unwrap();
                        push(path, &y.name);
                        out.push(Difference {
                            path: display_path(path),
                            what: format!("only in the second ({})", kind_name(&y.kind)),
                        });
                    }
                    std::cmp::Ordering::Equal => {
                        let (x, y) = (ia.next().unwrap(), ib.next().unwrap());
                        push(path, &x.name);
                        walk(x, y, path, opts, false, out, files);
                    }
                }
                path.truncate(len);
            }
        }
        (Kind::File(fa), Kind::File(fb)) => files.push((path.clone(), fa, fb)),
        (Kind::Symlink(ta), Kind::Symlink(tb)) if ta != tb => diff(format!(
            "symlink target {:?} != {:?}",
            String::from_utf8_lossy(ta),
            String::from_utf8_lossy(tb)
        )),
        (Kind::BlockDev(x), Kind::BlockDev(y)) | (Kind::CharDev(x), Kind::CharDev(y)) if x != y => {
            diff(format!("device {x:#x} != {y:#x}"))
        }
        (ka, kb) if std::mem::discriminant(ka) != std::mem::discriminant(kb) => {
            diff(format!("{} != {}", kind_name(ka), kind_name(kb)))
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Meta;

    fn meta() -> Meta {
        Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        }
    }

    fn file(name: &str, data: &[u8]) -> Node {
        Node {
            name: name.into(),
            meta: meta(),
            kind: Kind::File(FileContent::from_bytes(data.to_vec())),
        }
    }

    #[test]
    fn finds_every_kind_of_difference() {
        let a = Node::dir(
            "",
            meta(),
            vec![
                file("same", b"1"),
                file("changed", b"a"),
                file("gone", b"x"),
            ],
        );
        let mut owner = file("same", b"1");
        owner.meta.uid = 33;
        let b = Node::dir(
            "",
            meta(),
            vec![
                owner,
                file("changed", b"b"),
                Node {
                    name: b"new".to_vec(),
                    meta: meta(),
                    kind: Kind::Symlink(b"t".to_vec()),
                },
            ],
        );
        let d = compare_trees(&a, &b, CompareOptions::default()).unwrap();
        let text: Vec<String> = d.iter().map(|x| x.to_string()).collect();
        assert_eq!(
            text,
            [
                "changed: contents differ",
                "gone: only in the first (file)",
                "new: only in the second (symlink)",
                "same: owner 0:0 != 33:0"
            ]
        );
        assert!(
            compare_trees(&a, &a, CompareOptions::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn kept_digests_answer_for_the_second_tree() {
        let tree = |f: &[u8]| Node::dir("", meta(), vec![file("f", f), file("g", b"2")]);
        let (a, b) = (tree(b"1"), tree(b"1"));
        let memo = ContentDigests::default();
        let opts = CompareOptions::default();
        assert!(
            compare_trees_with(&a, &b, opts, Some(&memo))
                .unwrap()
                .is_empty()
        );
        assert_eq!(memo.len(), 2);
        // The kept digests stand for the tree they were computed from, even
        // where another tree is given: callers bind a memo to one image.
        let other = tree(b"9");
        assert!(
            compare_trees_with(&a, &other, opts, Some(&memo))
                .unwrap()
                .is_empty()
        );
        assert_eq!(compare_trees(&a, &other, opts).unwrap().len(), 1);
        // The first tree is always hashed.
        let d = compare_trees_with(&other, &b, opts, Some(&memo)).unwrap();
        assert_eq!(d.len(), 1, "{d:?}");
    }
}

//! The overlay diff of two system trees: exactly what Tails' method leaves
//! in the upper directory of an overlayfs mounted over the old tree after
//! `rsync --archive --delete-after --acls --checksum --xattrs NEW/ UNION/`,
//! with every `trusted.overlay.*` xattr removed — computed from the two
//! trees, without mounting anything.
//!
//! The rules (tails-iuk.md §2.2):
//! * an entry only in the new tree is in the diff with its whole subtree;
//! * an entry only in the old tree becomes a whiteout (character device
//!   0:0, mode 0000, owner 0:0) at the topmost deleted path;
//! * a regular file whose contents, mode, owner, mtime or xattrs differ is in
//!   the diff whole (overlayfs copies up whole files); the same for a
//!   symlink, device, fifo or socket whose target, number or metadata differ;
//! * an entry whose type changed is replaced by the new one (for a new
//!   directory, with its whole subtree);
//! * a directory is in the diff (with the new tree's metadata, and only its
//!   changed entries) when anything below it changed or its own metadata did;
//! * hard links are not preserved; the diff's root carries the new root's
//!   xattrs.
//!
//! xattrs are listed in descending key order: that is how tmpfs (where
//! the upper directory lives) lists them on kernels since 6.2, whose xattr
//! rbtree gensquashfs then reads; the order decides the xattr table's bytes.

use std::collections::HashMap;
use std::io::Read;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::tree::{FileContent, Kind, Meta, Node, Source, Xattr};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffOptions {
    /// `--ignore-if-same-content` globs (relative to the diff's root, shell
    /// syntax): matching files whose contents did not change are left out
    /// even if their metadata did.
    pub ignore_if_same_content: Vec<String>,
}

/// How the content comparisons were decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// File pairs of equal size whose contents had to be compared.
    pub compared: u64,
    /// Of those, decided from the stored (compressed) bytes alone.
    pub decided_from_blocks: u64,
    /// Bytes decompressed and compared for the rest (both files, each up
    /// to the first difference).
    pub compared_bytes: u64,
    pub changed_files: u64,
    pub whiteouts: u64,
}

const WHITEOUT_MODE: u16 = 0;

fn whiteout(name: &[u8], mtime: u32) -> Node {
    Node {
        name: name.to_vec(),
        meta: Meta {
            mode: WHITEOUT_MODE,
            uid: 0,
            gid: 0,
            mtime,
            xattrs: Vec::new(),
        },
        kind: Kind::CharDev(0),
    }
}

fn clean_xattrs(x: &[Xattr]) -> Vec<Xattr> {
    let mut out: Vec<Xattr> = x
        .iter()
        .filter(|(k, _)| !k.starts_with(b"trusted.overlay."))
        .cloned()
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0));
    out
}

fn meta_differs(a: &Meta, b: &Meta) -> bool {
    a.mode != b.mode
        || a.uid != b.uid
        || a.gid != b.gid
        || a.mtime != b.mtime
        || clean_xattrs(&a.xattrs) != clean_xattrs(&b.xattrs)
}

/// The new tree's node as it appears in the diff: metadata kept, xattrs
/// cleaned, time set to `mtime`, subtree included.
fn copy_new(n: &Node, mtime: u32) -> Node {
    Node {
        name: n.name.clone(),
        meta: Meta {
            mtime,
            xattrs: clean_xattrs(&n.meta.xattrs),
            ..n.meta.clone()
        },
        kind: match &n.kind {
            Kind::Dir(c) => Kind::Dir(c.iter().map(|x| copy_new(x, mtime)).collect()),
            other => other.clone(),
        },
    }
}

/// Computes the diff tree. Every inode time in it is `mtime`
/// (SOURCE_DATE_EPOCH), as gensquashfs sets them; the root is 0755 root:root
/// as gensquashfs makes it.
pub fn overlay_diff(
    old: &Node,
    new: &Node,
    mtime: u32,
    opts: &DiffOptions,
    progress: &dyn Progress,
) -> Result<(Node, DiffStats)> {
    if !old.is_dir() || !new.is_dir() {
        return Err(Error::Invalid("both trees must be directories".into()));
    }
    let mut stats = DiffStats::default();

    // First every same-size file pair, compared in parallel, in the order
    // of the new image's data: the tails of small files share fragment
    // blocks, and once a changed file has shifted the packing, comparing
    // them means decompressing those blocks. In data order each block is
    // decompressed about once per image (the reader keeps the last few);
    // in path order they are evicted and decompressed again. The order
    // changes no result.
    let mut pairs: Vec<(Vec<u8>, &FileContent, &FileContent)> = Vec::new();
    collect_pairs(old, new, b"", &mut pairs);
    pairs.sort_by_key(|(_, _, b)| data_order(b));
    let total: u64 = pairs.iter().map(|p| p.1.size).sum();
    progress.phase("compare", total);
    let decided: Vec<Result<(bool, bool, u64)>> = pairs
        .par_iter()
        .map(|(_, a, b)| {
            if progress.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let r = same_content(a, b);
            progress.advance(a.size);
            r
        })
        .collect();
    let mut changed: HashMap<Vec<u8>, bool> = HashMap::with_capacity(pairs.len());
    for ((path, _, _), d) in pairs.iter().zip(decided) {
        let (same, from_blocks, hashed) = d?;
        stats.compared += 1;
        stats.decided_from_blocks += from_blocks as u64;
        stats.compared_bytes += hashed;
        changed.insert(path.clone(), !same);
    }

    let mut root = Node {
        name: Vec::new(),
        meta: Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime,
            xattrs: clean_xattrs(&new.meta.xattrs),
        },
        kind: Kind::Dir(Vec::new()),
    };
    let children = diff_children(old, new, b"", mtime, &changed);
    root.kind = Kind::Dir(children);

    for pattern in &opts.ignore_if_same_content {
        let matches = glob_matches(&root, pattern)?;
        for path in matches {
            if let Some(old_file) = find_file(old, &path)
                && let Some(new_file) = find_file(new, &path)
                && same_content(old_file, new_file)?.0
            {
                root.remove_path(&path);
            }
        }
    }
    count(&root, &mut stats);
    Ok((root, stats))
}

fn count(n: &Node, stats: &mut DiffStats) {
    match &n.kind {
        Kind::Dir(c) => c.iter().for_each(|x| count(x, stats)),
        Kind::File(_) => stats.changed_files += 1,
        Kind::CharDev(0) if n.meta.mode == WHITEOUT_MODE && n.meta.uid == 0 => stats.whiteouts += 1,
        _ => {}
    }
}

/// Where a file's data lies in its image: its fragment block first (the
/// part that is shared), else its first block.
fn data_order(f: &FileContent) -> (u32, u64) {
    match &f.source {
        Source::Image(x) => {
            let i = x.inode();
            (i.fragment_index, i.blocks_start)
        }
        _ => (u32::MAX, 0),
    }
}

/// Returns (same, decided from stored blocks, bytes decompressed).
fn same_content(a: &FileContent, b: &FileContent) -> Result<(bool, bool, u64)> {
    if a.size != b.size {
        return Ok((false, false, 0));
    }
    if let (Source::Image(x), Source::Image(y)) = (&a.source, &b.source)
        && let Some(same) = x.same_stored_content(y)?
    {
        return Ok((same, true, 0));
    }
    let (same, read) = same_bytes(a, b)?;
    Ok((same, false, read * 2))
}

/// Reads two files of the same size side by side up to their first
/// difference: a changed library of tens of MiB is usually told apart in its
/// first block, where hashing both would decompress all of them. Returns
/// (same, bytes read from each).
fn same_bytes(a: &FileContent, b: &FileContent) -> Result<(bool, u64)> {
    const CHUNK: u64 = 1 << 17;
    let (mut ra, mut rb) = (a.open()?, b.open()?);
    let (mut x, mut y) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut done = 0u64;
    while done < a.size {
        let n = (a.size - done).min(CHUNK) as usize;
        for (r, buf, f) in [(&mut ra, &mut x, a), (&mut rb, &mut y, b)] {
            r.read_exact(&mut buf[..n])
                .map_err(|e| Error::io(f.describe(), e))?;
        }
        done += n as u64;
        if x[..n] != y[..n] {
            return Ok((false, done));
        }
    }
    Ok((true, done))
}

fn join(path: &[u8], name: &[u8]) -> Vec<u8> {
    if path.is_empty() {
        name.to_vec()
    } else {
        [path, b"/", name].concat()
    }
}

fn collect_pairs<'a>(
    old: &'a Node,
    new: &'a Node,
    path: &[u8],
    out: &mut Vec<(Vec<u8>, &'a FileContent, &'a FileContent)>,
) {
    let oc = old.children();
    for n in new.children() {
        let Ok(i) = oc.binary_search_by(|o| o.name.cmp(&n.name)) else {
            continue;
        };
        let o = &oc[i];
        let p = join(path, &n.name);
        match (&o.kind, &n.kind) {
            (Kind::File(a), Kind::File(b)) if a.size == b.size => out.push((p, a, b)),
            (Kind::Dir(_), Kind::Dir(_)) => collect_pairs(o, n, &p, out),
            _ => {}
        }
    }
}

fn diff_children(
    old: &Node,
    new: &Node,
    path: &[u8],
    mtime: u32,
    changed: &HashMap<Vec<u8>, bool>,
) -> Vec<Node> {
    let (oc, nc) = (old.children(), new.children());
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < oc.len() || j < nc.len() {
        let ord = match (oc.get(i), nc.get(j)) {
            (Some(o), Some(n)) => o.name.cmp(&n.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                out.push(whiteout(&oc[i].name, mtime));
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(copy_new(&nc[j], mtime));
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (o, n) = (&oc[i], &nc[j]);
                let p = join(path, &n.name);
                let entry = match (&o.kind, &n.kind) {
                    (Kind::Dir(_), Kind::Dir(_)) => {
                        let kids = diff_children(o, n, &p, mtime, changed);
                        (!kids.is_empty() || meta_differs(&o.meta, &n.meta)).then(|| {
                            let mut d = copy_new(n, mtime);
                            d.kind = Kind::Dir(kids);
                            d
                        })
                    }
                    (Kind::File(a), Kind::File(b)) => {
                        let content_changed =
                            a.size != b.size || changed.get(&p).copied().unwrap_or(true);
                        (content_changed || meta_differs(&o.meta, &n.meta))
                            .then(|| copy_new(n, mtime))
                    }
                    (Kind::Symlink(a), Kind::Symlink(b)) => {
                        (a != b || meta_differs(&o.meta, &n.meta)).then(|| copy_new(n, mtime))
                    }
                    (Kind::BlockDev(a), Kind::BlockDev(b))
                    | (Kind::CharDev(a), Kind::CharDev(b)) => {
                        (a != b || meta_differs(&o.meta, &n.meta)).then(|| copy_new(n, mtime))
                    }
                    (Kind::Fifo, Kind::Fifo) | (Kind::Socket, Kind::Socket) => {
                        meta_differs(&o.meta, &n.meta).then(|| copy_new(n, mtime))
                    }
                    _ => Some(copy_new(n, mtime)),
                };
                out.extend(entry);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

fn find_file<'a>(root: &'a Node, path: &[u8]) -> Option<&'a FileContent> {
    let mut cur = root;
    for comp in path.split(|&b| b == b'/') {
        let c = cur.children();
        cur = &c[c.binary_search_by(|x| x.name.as_slice().cmp(comp)).ok()?];
    }
    match &cur.kind {
        Kind::File(f) => Some(f),
        _ => None,
    }
}

/// Paths of the diff matching a shell glob (as Perl's `glob` expands it on
/// the upper directory): `*`, `?`, `[...]` and `{a,b}`; wildcards do not
/// match a leading dot.
pub fn glob_matches(root: &Node, pattern: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for alt in expand_braces(pattern.as_bytes())? {
        let comps: Vec<&[u8]> = alt
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        if comps.is_empty() {
            continue;
        }
        glob_walk(root, &comps, b"", &mut out);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn glob_walk(n: &Node, comps: &[&[u8]], path: &[u8], out: &mut Vec<Vec<u8>>) {
    let Some((first, rest)) = comps.split_first() else {
        return;
    };
    for c in n.children() {
        if !component_matches(first, &c.name) {
            continue;
        }
        let p = join(path, &c.name);
        if rest.is_empty() {
            out.push(p);
        } else {
            glob_walk(c, rest, &p, out);
        }
    }
}

fn expand_braces(p: &[u8]) -> Result<Vec<Vec<u8>>> {
    let Some(open) = p.iter().position(|&b| b == b'{') else {
        return Ok(vec![p.to_vec()]);
    };
    let mut depth = 0;
    let mut close = None;
    for (i, &b) in p.iter().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(i);
                    break;
                }
            }
            _ => {}
        }
    }
    let Some(close) = close else {
        return Err(Error::Invalid(format!(
            "unbalanced '{{' in glob {}",
            String::from_utf8_lossy(p)
        )));
    };
    let inner = &p[open + 1..close];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, &b) in inner.iter().enumerate() {
        match b {
            b'{' => depth += 1,
            b'}' => depth -= 1,
            b',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    let mut out = Vec::new();
    for part in parts {
        let candidate = [&p[..open], part, &p[close + 1..]].concat();
        out.extend(expand_braces(&candidate)?);
    }
    Ok(out)
}

fn component_matches(pat: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && pat.first() != Some(&b'.') {
        return false;
    }
    wildcard(pat, name)
}

fn wildcard(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|k| wildcard(rest, &s[k..])),
        Some((b'?', rest)) => !s.is_empty() && wildcard(rest, &s[1..]),
        Some((b'[', rest)) => {
            let Some(end) = rest.iter().skip(1).position(|&b| b == b']').map(|e| e + 1) else {
                return s.first() == Some(&b'[') && wildcard(rest, &s[1..]);
            };
            let Some((&c, s_rest)) = s.split_first() else {
                return false;
            };
            let (negate, set) = match rest[..end].split_first() {
                Some((b'!' | b'^', set)) => (true, set),
                _ => (false, &rest[..end]),
            };
            let mut hit = false;
            let mut k = 0;
            while k < set.len() {
                if k + 2 < set.len() && set[k + 1] == b'-' {
                    hit |= (set[k]..=set[k + 2]).contains(&c);
                    k += 3;
                } else {
                    hit |= set[k] == c;
                    k += 1;
                }
            }
            hit != negate && wildcard(&rest[end + 1..], s_rest)
        }
        Some((b'\\', rest)) if !rest.is_empty() => {
            s.first() == Some(&rest[0]) && wildcard(&rest[1..], &s[1..])
        }
        Some((&c, rest)) => s.first() == Some(&c) && wildcard(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    fn m(mode: u16) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: 100,
            xattrs: Vec::new(),
        }
    }
    fn f(name: &str, data: &str) -> Node {
        Node {
            name: name.into(),
            meta: m(0o644),
            kind: Kind::File(FileContent::from_bytes(data.as_bytes().to_vec())),
        }
    }
    fn d(name: &str, c: Vec<Node>) -> Node {
        Node::dir(name, m(0o755), c)
    }

    #[test]
    fn same_size_files_are_read_only_up_to_their_first_difference() {
        let size = 1 << 20;
        let a = FileContent::from_bytes(vec![7u8; size]);
        let mut early = vec![7u8; size];
        early[10] = 8;
        let mut late = vec![7u8; size];
        late[size - 1] = 8;
        let read = |x: &FileContent, y: &FileContent| same_bytes(x, y).unwrap();
        assert_eq!(read(&a, &FileContent::from_bytes(early)), (false, 1 << 17));
        assert_eq!(
            read(&a, &FileContent::from_bytes(late)),
            (false, size as u64)
        );
        assert_eq!(
            read(&a, &FileContent::from_bytes(vec![7u8; size])),
            (true, size as u64)
        );
        let empty = FileContent::from_bytes(Vec::new());
        assert_eq!(read(&empty, &empty), (true, 0));
    }
    fn paths(n: &Node) -> Vec<String> {
        let mut out = Vec::new();
        n.walk(&mut |p, x| {
            let tag = match x.kind {
                Kind::Dir(_) => "/",
                Kind::CharDev(0) => " (whiteout)",
                _ => "",
            };
            out.push(format!("{}{tag}", String::from_utf8_lossy(p)));
        });
        out
    }

    #[test]
    fn overlay_semantics() {
        let old = d(
            "",
            vec![
                d("etc", vec![f("os-release", "6.0"), f("same", "x")]),
                d("gone", vec![d("deep", vec![f("a", "1")])]),
                f("to-dir", "file"),
                d("to-file", vec![f("x", "y")]),
                f("meta-only", "same"),
                d("untouched", vec![f("u", "u")]),
                Node {
                    name: b"link".to_vec(),
                    meta: m(0o777),
                    kind: Kind::Symlink(b"a".to_vec()),
                },
            ],
        );
        let mut meta_only = f("meta-only", "same");
        meta_only.meta.uid = 33;
        let new = d(
            "",
            vec![
                d(
                    "etc",
                    vec![f("os-release", "6.1"), f("same", "x"), f("new", "n")],
                ),
                d("to-dir", vec![f("inside", "i")]),
                f("to-file", "now a file"),
                meta_only,
                d("untouched", vec![f("u", "u")]),
                Node {
                    name: b"link".to_vec(),
                    meta: m(0o777),
                    kind: Kind::Symlink(b"b".to_vec()),
                },
            ],
        );
        let (diff, stats) =
            overlay_diff(&old, &new, 7, &DiffOptions::default(), &NoProgress).unwrap();
        assert_eq!(
            paths(&diff),
            [
                "/",
                "etc/",
                "etc/new",
                "etc/os-release",
                "gone (whiteout)",
                "link",
                "meta-only",
                "to-dir/",
                "to-dir/inside",
                "to-file",
            ]
        );
        assert_eq!(stats.whiteouts, 1);
        let mut all_sde = true;
        diff.walk(&mut |_, n| all_sde &= n.meta.mtime == 7);
        assert!(all_sde);

        let opts = DiffOptions {
            ignore_if_same_content: vec!["meta-*".into(), "{etc,usr}/os-*".into()],
        };
        let (diff, _) = overlay_diff(&old, &new, 7, &opts, &NoProgress).unwrap();
        let p = paths(&diff);
        assert!(
            !p.contains(&"meta-only".to_string()),
            "same content ignored: {p:?}"
        );
        assert!(
            p.contains(&"etc/os-release".to_string()),
            "changed content kept: {p:?}"
        );
    }

    #[test]
    fn globs() {
        assert!(wildcard(b"*.so.[0-9]", b"libc.so.6"));
        assert!(!wildcard(b"*.so.[!0-9]", b"libc.so.6"));
        assert!(wildcard(b"a?c", b"abc"));
        assert!(!component_matches(b"*", b".hidden"));
        assert!(component_matches(b".*", b".hidden"));
        assert_eq!(
            expand_braces(b"{a,b{c,d}}/x").unwrap(),
            [b"a/x".to_vec(), b"bc/x".to_vec(), b"bd/x".to_vec()]
        );
    }
}

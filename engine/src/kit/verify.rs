//! Verify-by-apply: installs a kit in memory the way Tails' installer and
//! live-boot would, on top of the old release, and compares the result with
//! the new release (tails-iuk.md §6).
//!
//! * The system: every `overlay/live/*.squashfs` diff is stacked on the old
//!   `filesystem.squashfs` as overlayfs would (whiteouts hide, directories
//!   merge, anything else replaces), in name order; the result must equal the
//!   new system entry for entry (types, modes, owners, xattrs, link targets,
//!   device numbers, contents).
//! * The boot files: the old ISO's `EFI/`, `isolinux/` (installed as
//!   `syslinux/`), `utils/` and kernels, then `overlay/` copied on top, then
//!   `delete_files` removed; names and contents must equal the new ISO's
//!   (the boot partition is FAT: no modes or owners).

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{
    FORMAT, OpenIso, diff_writer_options, is_kernel_name, iso_tree, kit_writer_options, open_iso,
    open_system, to_syslinux,
};
use crate::compare::{
    CompareOptions, ContentDigests, Difference, compare_trees, compare_trees_with,
};
use crate::error::{Error, Result};
use crate::iso::Iso;
use crate::progress::Progress;
use crate::sqfs::Archive;
use crate::sqfs::format::Superblock;
use crate::tree::{Kind, Meta, Node};

/// What verification found; `differences` empty means the kit is good.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub differences: Vec<Difference>,
    pub diffs_applied: Vec<String>,
    pub delete_files: Vec<Vec<u8>>,
}

/// What verifying a kit learns about the new system image that verifying
/// the next kit against the same image reuses: its files' digests (about
/// half of a verification's work). Kept per image: the first verification
/// binds the memo to its new image (by superblock), and a verification
/// against another image neither uses nor changes it.
#[derive(Debug, Default)]
pub struct VerifyMemo {
    image: Mutex<Option<Superblock>>,
    system: ContentDigests,
}

impl VerifyMemo {
    fn for_image(&self, sb: &Superblock) -> Option<&ContentDigests> {
        let mut image = self.image.lock().unwrap_or_else(|p| p.into_inner());
        match &*image {
            Some(bound) if bound != sb => None,
            Some(_) => Some(&self.system),
            None => {
                *image = Some(sb.clone());
                Some(&self.system)
            }
        }
    }
}

fn problem(path: &str, what: impl Into<String>) -> Difference {
    Difference {
        path: path.into(),
        what: what.into(),
    }
}

/// Parses the `control.yml` that Tails' reader accepts: a mapping whose
/// `delete_files` is a list of strings (plain, single- or double-quoted).
pub fn parse_control_yml(data: &[u8]) -> Result<Vec<Vec<u8>>> {
    let text =
        std::str::from_utf8(data).map_err(|_| Error::Invalid("control.yml is not UTF-8".into()))?;
    let mut out = Vec::new();
    let mut in_list = false;
    for line in text.lines() {
        if line == "---" || line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("delete_files:") {
            let rest = rest.trim();
            if rest == "[]" {
                return Ok(Vec::new());
            }
            if !rest.is_empty() {
                return Err(Error::Invalid(format!(
                    "control.yml: unsupported delete_files value {rest:?}"
                )));
            }
            in_list = true;
            continue;
        }
        match line.strip_prefix("- ") {
            Some(item) if in_list => out.push(unquote(item)?),
            _ => {
                return Err(Error::Invalid(format!(
                    "control.yml: unexpected line {line:?}"
                )));
            }
        }
    }
    Ok(out)
}

fn unquote(s: &str) -> Result<Vec<u8>> {
    if let Some(inner) = s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return Ok(inner.replace("''", "'").into_bytes());
    }
    if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        let mut out = Vec::new();
        let b = inner.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 1 < b.len() {
                match b[i + 1] {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'x' if i + 3 < b.len() => {
                        let h = std::str::from_utf8(&b[i + 2..i + 4]).unwrap_or("");
                        out.push(u8::from_str_radix(h, 16).map_err(|_| {
                            Error::Invalid(format!("control.yml: bad escape in {s}"))
                        })?);
                        i += 2;
                    }
                    c => out.push(c),
                }
                i += 2;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        return Ok(out);
    }
    Ok(s.as_bytes().to_vec())
}

fn is_whiteout(n: &Node) -> bool {
    matches!(n.kind, Kind::CharDev(0))
}

fn is_opaque(n: &Node) -> bool {
    n.meta
        .xattrs
        .iter()
        .any(|(k, v)| k == b"trusted.overlay.opaque" && v == b"y")
}

/// `upper` stacked on `lower` as overlayfs shows it (None: hidden).
pub fn apply_overlay(lower: Option<&Node>, upper: &Node) -> Option<Node> {
    if is_whiteout(upper) {
        return None;
    }
    let Kind::Dir(uc) = &upper.kind else {
        return Some(upper.clone());
    };
    let lc: &[Node] = match lower {
        Some(l) if l.is_dir() && !is_opaque(upper) => l.children(),
        _ => &[],
    };
    let mut children = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < lc.len() || j < uc.len() {
        let ord = match (lc.get(i), uc.get(j)) {
            (Some(a), Some(b)) => a.name.cmp(&b.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                children.push(lc[i].clone());
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                children.extend(apply_overlay(None, &uc[j]));
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                children.extend(apply_overlay(Some(&lc[i]), &uc[j]));
                i += 1;
                j += 1;
            }
        }
    }
    Some(Node {
        name: upper.name.clone(),
        meta: upper.meta.clone(),
        kind: Kind::Dir(children),
    })
}

/// Files copied onto a directory tree without deleting anything (rsync
/// --recursive without --delete).
fn copy_onto(base: &mut Node, src: &Node) {
    let Kind::Dir(bc) = &mut base.kind else {
        return;
    };
    for s in src.children() {
        match bc.binary_search_by(|b| b.name.cmp(&s.name)) {
            Ok(i) if bc[i].is_dir() && s.is_dir() => copy_onto(&mut bc[i], s),
            Ok(i) => bc[i] = s.clone(),
            Err(i) => bc.insert(i, s.clone()),
        }
    }
}

fn empty_meta() -> Meta {
    Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        xattrs: Vec::new(),
    }
}

/// The boot files an installed medium has for a release: EFI/, syslinux/
/// (the ISO's isolinux/, converted), utils/ and the kernels in live/.
fn medium(iso: &Iso) -> Result<Node> {
    let mut top = Vec::new();
    for dir in ["EFI", "utils"] {
        match iso_tree(iso, dir, 0) {
            Ok(t) => top.push(t),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    match iso_tree(iso, "isolinux", 0) {
        Ok(t) => top.push(to_syslinux(t)?),
        Err(Error::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    let mut live = Vec::new();
    if let Ok(entries) = iso.list(b"live") {
        for e in entries
            .into_iter()
            .filter(|e| !e.is_dir && !e.name.ends_with(b".squashfs"))
        {
            let path = [b"live/".as_slice(), &e.name].concat();
            live.push(super::iso_node(iso, &path, &e, 0, 0)?);
        }
    }
    top.push(Node::dir("live", empty_meta(), live));
    Ok(Node::dir("", empty_meta(), top))
}

/// Lower-cases every name, as FAT's case-insensitive lookups see them; of
/// names equal but for case, the last one wins.
fn fold_case(mut n: Node) -> Node {
    n.name.make_ascii_lowercase();
    if let Kind::Dir(children) = n.kind {
        let mut folded: Vec<Node> = children.into_iter().map(fold_case).collect();
        folded.sort_by(|a, b| a.name.cmp(&b.name));
        folded.dedup_by(|later, earlier| {
            let same = later.name == earlier.name;
            if same {
                std::mem::swap(later, earlier);
            }
            same
        });
        n.kind = Kind::Dir(folded);
    }
    n
}

fn live_dir(n: &mut Node) -> Option<&mut Vec<Node>> {
    let Kind::Dir(children) = &mut n.kind else {
        return None;
    };
    match children
        .iter_mut()
        .find(|c| c.name == b"live")
        .map(|l| &mut l.kind)
    {
        Some(Kind::Dir(live)) => Some(live),
        _ => None,
    }
}

/// IUKs maintain the kernels in live/ and delete what `delete_files` lists;
/// other live/ files (package lists, the module list) are the installer's
/// business. So: kernels must match, and a non-kernel file may only remain
/// if the new release still has one of that name.
fn prune_live(installed: &mut Node, expected: &mut Node) {
    let still: Vec<Vec<u8>> = live_dir(expected)
        .map(|l| l.iter().map(|x| x.name.clone()).collect())
        .unwrap_or_default();
    if let Some(l) = live_dir(installed) {
        l.retain(|x| is_kernel_name(&x.name) || !still.contains(&x.name));
    }
    if let Some(l) = live_dir(expected) {
        l.retain(|x| is_kernel_name(&x.name));
    }
}

/// Verifies `kit` by applying it to `old` and comparing with `new`;
/// `scratch` (an empty file in the job's directory) receives the diff.
/// With `memo`, the new system image's file digests are taken from and kept
/// for other verifications against the same `new`.
pub fn verify_iuk(
    old: &OpenIso,
    new: &OpenIso,
    kit: &Path,
    scratch: &File,
    progress: &dyn Progress,
    memo: Option<&VerifyMemo>,
) -> Result<Verification> {
    let f = File::open(kit).map_err(|e| Error::io(kit, e))?;
    // Every block of the kit and of its diff must be in our writer's exact
    // form, whoever compressed it (see `Archive::open_ours`).
    let ar = Archive::open_ours(Arc::new(f), kit_writer_options(0, 1).xz).map_err(|e| match e {
        Error::Corrupt(m) => Error::Corrupt(format!("{}: {m}", kit.display())),
        other => other,
    })?;
    let kit_tree = ar.to_tree()?;
    let mut v = Verification::default();
    let find = |name: &[u8]| kit_tree.children().iter().find(|c| c.name == name);

    match find(b"FORMAT").map(|n| &n.kind) {
        Some(Kind::File(f)) => {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut f.open()?, &mut data)?;
            if data != FORMAT {
                v.differences.push(problem(
                    "FORMAT",
                    format!("is {:?}, not \"2\"", String::from_utf8_lossy(&data)),
                ));
            }
        }
        _ => v.differences.push(problem(
            "FORMAT",
            "missing: the installer cannot tell the format",
        )),
    }
    let delete = match find(b"control.yml").map(|n| &n.kind) {
        Some(Kind::File(f)) => {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut f.open()?, &mut data)?;
            parse_control_yml(&data)?
        }
        _ => Vec::new(),
    };
    v.delete_files = delete.clone();
    let overlay = match find(b"overlay") {
        Some(o) if o.is_dir() => o.clone(),
        _ => {
            v.differences.push(problem("overlay", "missing"));
            Node::dir("overlay", empty_meta(), Vec::new())
        }
    };

    progress.phase("verify", 0);
    let (old_iso, new_iso) = (old.path.as_path(), new.path.as_path());
    let old = open_iso(old)?;
    let new = open_iso(new)?;

    // The system: diffs stacked on the old image, in name order.
    let mut system = open_system(&old, old_iso)?.to_tree()?;
    let diffs: Vec<&Node> = overlay
        .children()
        .iter()
        .find(|c| c.name == b"live")
        .map(|l| {
            l.children()
                .iter()
                .filter(|c| c.name.ends_with(b".squashfs") && matches!(c.kind, Kind::File(_)))
                .collect()
        })
        .unwrap_or_default();
    if diffs.len() > 1 {
        return Err(Error::Unsupported(format!(
            "{} SquashFS diffs in overlay/live/; Tails IUKs have one",
            diffs.len()
        )));
    }
    for d in &diffs {
        let Kind::File(content) = &d.kind else {
            continue;
        };
        let name = String::from_utf8_lossy(&d.name).into_owned();
        // The diff is copied out of the kit into the scratch file, then read
        // in place from there.
        scratch.set_len(0)?;
        let mut w = scratch.try_clone()?;
        std::io::copy(&mut content.open()?, &mut w)?;
        let src: Arc<dyn crate::io::ReadAt> = Arc::new(scratch.try_clone()?);
        let diff_tree = Archive::open_ours(src, diff_writer_options(0, 1).xz)
            .map_err(|e| Error::Corrupt(format!("overlay/live/{name}: {e}")))?
            .to_tree()?;
        system = apply_overlay(Some(&system), &diff_tree)
            .unwrap_or_else(|| Node::dir("", empty_meta(), Vec::new()));
        v.diffs_applied.push(name);
    }
    let new_system = open_system(&new, new_iso)?;
    let want = new_system.to_tree()?;
    let opts = CompareOptions {
        ignore_root_meta: true,
        ..Default::default()
    };
    let digests = memo.and_then(|m| m.for_image(new_system.superblock()));
    for mut d in compare_trees_with(&system, &want, opts, digests)? {
        d.path = format!("system: {}", d.path);
        v.differences.push(d);
    }

    // The boot files, on a FAT partition: names compare case-insensitively
    // (delete_files holds libcdio's lower-cased names).
    let mut installed = fold_case(medium(&old)?);
    let mut copied = fold_case(overlay.clone());
    if let Kind::Dir(c) = &mut copied.kind
        && let Some(live) = c.iter_mut().find(|x| x.name == b"live")
        && let Kind::Dir(l) = &mut live.kind
    {
        l.retain(|x| !x.name.ends_with(b".squashfs"));
    }
    copy_onto(&mut installed, &copied);
    for p in &delete {
        installed.remove_path(&p.to_ascii_lowercase());
    }
    let mut expected = fold_case(medium(&new)?);
    prune_live(&mut installed, &mut expected);
    let opts = CompareOptions {
        contents_only: true,
        ..Default::default()
    };
    for mut d in compare_trees(&installed, &expected, opts)? {
        d.path = format!("boot: {}", d.path);
        v.differences.push(d);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memo_serves_only_the_image_it_was_first_used_with() {
        let sb = |bytes_used| Superblock {
            inode_count: 1,
            modification_time: 0,
            block_size: 1 << 20,
            fragment_entry_count: 0,
            compression_id: 4,
            block_log: 20,
            flags: 0,
            id_count: 1,
            version_major: 4,
            version_minor: 0,
            root_inode_ref: 0,
            bytes_used,
            id_table_start: 0,
            xattr_id_table_start: u64::MAX,
            inode_table_start: 96,
            directory_table_start: 96,
            fragment_table_start: u64::MAX,
            export_table_start: u64::MAX,
        };
        let memo = VerifyMemo::default();
        assert!(memo.for_image(&sb(4096)).is_some());
        assert!(memo.for_image(&sb(4096)).is_some());
        assert!(memo.for_image(&sb(8192)).is_none());
        assert!(memo.for_image(&sb(4096)).is_some());
    }

    #[test]
    fn control_yml_round_trip() {
        let items = vec![
            b"EFI/BOOT/a".to_vec(),
            b"live/6.0".to_vec(),
            b"it's: odd".to_vec(),
        ];
        assert_eq!(
            parse_control_yml(&super::super::yaml::control_yml(&items)).unwrap(),
            items
        );
        assert!(
            parse_control_yml(b"---\ndelete_files: []\n")
                .unwrap()
                .is_empty()
        );
        assert!(parse_control_yml(b"---\nsomething: else\n").is_err());
    }
}

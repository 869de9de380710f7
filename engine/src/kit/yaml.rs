//! `control.yml` exactly as Perl's YAML::XS (libyaml's emitter) writes
//! `{delete_files => [...]}`: a document start marker, the sequence not
//! indented under its key, plain scalars where libyaml allows them and
//! single-quoted ones otherwise.

/// The bytes of `control.yml` for a list of paths to delete.
pub fn control_yml(delete_files: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"---\ndelete_files:".to_vec();
    if delete_files.is_empty() {
        out.extend_from_slice(b" []\n");
        return out;
    }
    out.push(b'\n');
    for f in delete_files {
        out.extend_from_slice(b"- ");
        out.extend_from_slice(&scalar(f));
        out.push(b'\n');
    }
    out
}

/// A scalar as libyaml emits a block-context sequence item.
fn scalar(s: &[u8]) -> Vec<u8> {
    if plain_allowed(s) {
        return s.to_vec();
    }
    if s.iter().all(|&c| (0x20..0x7F).contains(&c)) {
        let mut out = vec![b'\''];
        for &c in s {
            if c == b'\'' {
                out.push(b'\'');
            }
            out.push(c);
        }
        out.push(b'\'');
        return out;
    }
    // Line breaks, control characters or bytes outside printable ASCII:
    // libyaml falls back to a double-quoted, escaped scalar.
    let mut out = vec![b'"'];
    for &c in s {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x20..=0x7E => out.push(c),
            _ => out.extend_from_slice(format!("\\x{c:02X}").as_bytes()),
        }
    }
    out.push(b'"');
    out
}

/// libyaml's `yaml_emitter_analyze_scalar` rules for a plain scalar in
/// block context, plus YAML::XS's quoting of strings a loader would read as
/// something other than a string (numbers, booleans, null).
fn plain_allowed(s: &[u8]) -> bool {
    if s.is_empty() || !s.iter().all(|&c| (0x20..0x7F).contains(&c)) {
        return false;
    }
    if s.starts_with(b"---") || s.starts_with(b"...") {
        return false;
    }
    if s[0] == b' ' || s[s.len() - 1] == b' ' {
        return false;
    }
    let first = s[0];
    if b"#,[]{}&*!|>'\"%@`".contains(&first) {
        return false;
    }
    if matches!(first, b'-' | b'?' | b':') && s.get(1).is_none_or(|&c| c == b' ') {
        return false;
    }
    for (i, &c) in s.iter().enumerate() {
        let next = s.get(i + 1).copied();
        let prev = if i > 0 { Some(s[i - 1]) } else { None };
        if b",[]{}".contains(&c) && i > 0 {
            // Flow indicators are fine in block context.
            continue;
        }
        if c == b':' && next.is_none_or(|n| n == b' ') {
            return false;
        }
        if c == b'#' && prev == Some(b' ') {
            return false;
        }
    }
    !looks_like_non_string(s)
}

fn looks_like_non_string(s: &[u8]) -> bool {
    const WORDS: [&[u8]; 22] = [
        b"~", b"null", b"Null", b"NULL", b"true", b"True", b"TRUE", b"false", b"False", b"FALSE",
        b"y", b"Y", b"yes", b"Yes", b"YES", b"n", b"N", b"no", b"No", b"NO", b"on", b"off",
    ];
    if WORDS.contains(&s) {
        return true;
    }
    let t = s
        .strip_prefix(b"-")
        .or_else(|| s.strip_prefix(b"+"))
        .unwrap_or(s);
    !t.is_empty()
        && t.iter().all(|c| c.is_ascii_digit() || *c == b'.')
        && t.iter().filter(|&&c| c == b'.').count() <= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_as_yaml_xs_writes_them() {
        assert_eq!(control_yml(&[]), b"---\ndelete_files: []\n");
        assert_eq!(
            control_yml(&[b"EFI/BOOT/foo".to_vec(), b"live/bar".to_vec()]),
            b"---\ndelete_files:\n- EFI/BOOT/foo\n- live/bar\n"
        );
        assert_eq!(scalar(b"6.0"), b"'6.0'");
        assert_eq!(scalar(b"x: y"), b"'x: y'");
        assert_eq!(scalar(b"it's"), b"it's");
        assert_eq!(scalar(b"#a"), b"'#a'");
        assert_eq!(scalar(b"a #b"), b"'a #b'");
        assert_eq!(scalar(b"- a"), b"'- a'");
    }
}

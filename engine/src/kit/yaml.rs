//! YAML exactly as Perl's YAML::XS (libyaml's emitter, default options)
//! dumps it: a document start marker, mapping keys sorted, sequences not
//! indented under their key, plain scalars where libyaml allows them and
//! single-quoted ones otherwise. Used for `control.yml` and for Tails'
//! upgrade-description files.

/// A Perl value as YAML::XS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A Perl string: quoted when a loader would read it as anything else.
    Str(Vec<u8>),
    /// A Perl number: written as its text.
    Num(Vec<u8>),
    Seq(Vec<Value>),
    /// A hash; written with its keys in byte order.
    Map(Vec<(Vec<u8>, Value)>),
}

impl Value {
    pub fn str(s: impl AsRef<[u8]>) -> Value {
        Value::Str(s.as_ref().to_vec())
    }

    pub fn num(n: u64) -> Value {
        Value::Num(n.to_string().into_bytes())
    }

    pub fn map<K: AsRef<[u8]>>(entries: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (k.as_ref().to_vec(), v))
                .collect(),
        )
    }
}

/// The bytes YAML::XS's `Dump` gives for `v`.
pub fn dump(v: &Value) -> Vec<u8> {
    let mut out = b"---".to_vec();
    match v {
        Value::Str(_) | Value::Num(_) => {
            out.push(b' ');
            out.extend_from_slice(&leaf(v));
            out.push(b'\n');
        }
        _ if is_empty(v) => {
            out.push(b' ');
            out.extend_from_slice(&leaf(v));
            out.push(b'\n');
        }
        _ => {
            out.push(b'\n');
            node(&mut out, v, 0, false);
        }
    }
    out
}

fn is_empty(v: &Value) -> bool {
    matches!(v, Value::Seq(s) if s.is_empty()) || matches!(v, Value::Map(m) if m.is_empty())
}

/// A scalar or an empty collection, written on the line of its key.
fn leaf(v: &Value) -> Vec<u8> {
    match v {
        Value::Str(s) => scalar(s),
        Value::Num(n) => n.clone(),
        Value::Seq(_) => b"[]".to_vec(),
        Value::Map(_) => b"{}".to_vec(),
    }
}

/// Writes a non-empty collection at column `indent`; `inline`: its first
/// line continues a `- ` already written.
fn node(out: &mut Vec<u8>, v: &Value, indent: usize, mut inline: bool) {
    let pad = |out: &mut Vec<u8>, inline: &mut bool| {
        if !std::mem::take(inline) {
            out.extend(std::iter::repeat_n(b' ', indent));
        }
    };
    match v {
        Value::Map(m) => {
            let mut sorted: Vec<&(Vec<u8>, Value)> = m.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, v) in sorted {
                pad(out, &mut inline);
                out.extend_from_slice(&scalar(k));
                out.push(b':');
                match v {
                    // Sequences are not indented under their key.
                    Value::Seq(_) if !is_empty(v) => {
                        out.push(b'\n');
                        node(out, v, indent, false);
                    }
                    Value::Map(_) if !is_empty(v) => {
                        out.push(b'\n');
                        node(out, v, indent + 2, false);
                    }
                    _ => {
                        out.push(b' ');
                        out.extend_from_slice(&leaf(v));
                        out.push(b'\n');
                    }
                }
            }
        }
        Value::Seq(items) => {
            for item in items {
                pad(out, &mut inline);
                out.extend_from_slice(b"- ");
                if is_empty(item) || matches!(item, Value::Str(_) | Value::Num(_)) {
                    out.extend_from_slice(&leaf(item));
                    out.push(b'\n');
                } else {
                    node(out, item, indent + 2, true);
                }
            }
        }
        Value::Str(_) | Value::Num(_) => unreachable!("scalars are leaves"),
    }
}

/// The bytes of `control.yml` for a list of paths to delete.
pub fn control_yml(delete_files: &[Vec<u8>]) -> Vec<u8> {
    dump(&Value::map([(
        "delete_files",
        Value::Seq(delete_files.iter().map(Value::str).collect()),
    )]))
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

/// What YAML::XS quotes besides libyaml's own rules: the words its loader
/// reads as null or booleans, and (QuoteNumericStrings) whatever Perl's
/// `looks_like_number` takes for a number.
fn looks_like_non_string(s: &[u8]) -> bool {
    if [&b"~"[..], b"true", b"false", b"null"].contains(&s) {
        return true;
    }
    let t = s
        .strip_prefix(b"-")
        .or_else(|| s.strip_prefix(b"+"))
        .unwrap_or(s);
    let lower = t.to_ascii_lowercase();
    if [&b"inf"[..], b"infinity", b"nan"].contains(&&lower[..]) {
        return true;
    }
    let digits = |t: &[u8]| t.iter().take_while(|c| c.is_ascii_digit()).count();
    let int = digits(t);
    let mut i = int;
    let mut frac = 0;
    if t.get(i) == Some(&b'.') {
        frac = digits(&t[i + 1..]);
        i += 1 + frac;
    }
    if int + frac == 0 {
        return false;
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(t.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let exp = digits(&t[j.min(t.len())..]);
        if exp == 0 {
            return false;
        }
        i = j + exp;
    }
    i == t.len()
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

    #[test]
    fn quoted_like_yaml_xs_quotes_them() {
        // perl -MYAML::XS -e 'print Dump([...])' on these words.
        for q in [
            "true", "false", "null", "~", "1", "-1", "+1", "1.5", ".5", "1.", "1e3", "007", "-.5",
            "1e+3", "1E3", "-0", "1.5e-3", "+.5e1", "Inf", "-Inf", "nan", "NaN", "Infinity",
            "6.10",
        ] {
            assert_eq!(scalar(q.as_bytes()), format!("'{q}'").into_bytes(), "{q}");
        }
        for p in [
            "y", "Y", "yes", "no", "on", "off", "True", "FALSE", "Null", "0x1F", "0o7", ".inf",
            ".nan", "1_000", "1.2.3", "1e", "0.0.0", "nanx", "6.0~rc1", "6.9.1",
        ] {
            assert_eq!(scalar(p.as_bytes()), p.as_bytes(), "{p}");
        }
    }

    #[test]
    fn nested_collections_as_yaml_xs_writes_them() {
        let v = Value::map([
            (
                "b",
                Value::Seq(vec![Value::map([
                    (
                        "y",
                        Value::Seq(vec![Value::map([
                            ("q", Value::num(1)),
                            ("p", Value::str("6.0")),
                        ])]),
                    ),
                    ("x", Value::str("z")),
                ])]),
            ),
            ("a", Value::map([("k", Value::Seq(vec![]))])),
            (
                "c",
                Value::Seq(vec![Value::str("s"), Value::Seq(vec![Value::str("t")])]),
            ),
        ]);
        assert_eq!(
            String::from_utf8(dump(&v)).unwrap(),
            "---\na:\n  k: []\nb:\n- x: z\n  y:\n  - p: '6.0'\n    q: 1\nc:\n- s\n- - t\n"
        );
        assert_eq!(dump(&Value::str("6.0")), b"--- '6.0'\n");
        assert_eq!(dump(&Value::Map(vec![])), b"--- {}\n");
    }
}

//! Text a worker or client sends (a phase, a failure, a reason) on its way
//! to the RM's terminal, the log and the junit report: bounded, and without
//! control characters, so that it can neither rewrite the terminal (escape
//! sequences) nor flood it.

/// `s` with every control character (C0, C1, DEL) shown as `?` and at most
/// `max` characters kept, `…` marking a cut.
pub fn untrusted(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// How much of a failure message is kept.
pub const MESSAGE: usize = 1024;
/// How much of a phase name is kept.
pub const PHASE: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_floods_do_not_reach_a_terminal() {
        assert_eq!(
            untrusted("ok\x1b[2J\x1b]0;owned\x07\u{9b}31m\r\nnext", 100),
            "ok?[2J?]0;owned??31m??next"
        );
        let flood = "A".repeat(16 << 20);
        let kept = untrusted(&flood, MESSAGE);
        assert_eq!(kept.chars().count(), MESSAGE + 1);
        assert!(kept.ends_with('…'));
        assert_eq!(untrusted("compress", PHASE), "compress");
        assert_eq!(untrusted("é", 1), "é");
    }
}

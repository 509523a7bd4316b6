//! Text that reaches a client or a log line from somewhere less trusted (a client's input
//! echoed back, a script's reason): bounded and clean.

/// Longest id (client id, uid) a log line carries.
pub const LOGGED_ID: usize = 128;

/// `text` cut to at most `max` bytes on a character boundary, with control characters
/// (newlines included) replaced by spaces, so it can neither overflow a field nor forge a
/// log line.
pub fn clean(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_a_character_boundary_and_blanks_controls() {
        assert_eq!(clean("a\nb\u{1b}[31mc", 100), "a b [31mc");
        assert_eq!(clean("坏蛋坏蛋", 7), "坏蛋");
        assert_eq!(clean("", 3), "");
        assert_eq!(clean("abcdef", 3), "abc");
    }
}

//! Text that reaches a client or a log line from somewhere less trusted (a client's input
//! echoed back, a script's reason): bounded and clean.

/// Longest id (client id, uid) a log line carries.
pub const LOGGED_ID: usize = 128;

/// `text` cut to at most `max` bytes on a character boundary, with control characters
/// (newlines included) replaced by spaces, so it can neither overflow a field nor forge a
/// log line.
pub fn clean(text: &str, max: usize) -> String {
    cleaned(text, max).collect()
}

/// The characters [`clean`] keeps.
fn cleaned(text: &str, max: usize) -> impl Iterator<Item = char> + '_ {
    let mut room = max;
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take_while(move |c| {
            let fits = c.len_utf8() <= room;
            room = room.saturating_sub(c.len_utf8());
            fits
        })
}

/// An id as a log line shows it: [`clean`], at most [`LOGGED_ID`] bytes, written straight
/// into the line (a span field on every message costs no allocation).
#[derive(Debug, Clone, Copy)]
pub struct LoggedId<'a>(pub &'a str);

impl std::fmt::Display for LoggedId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        cleaned(self.0, LOGGED_ID).try_for_each(|c| std::fmt::Write::write_char(f, c))
    }
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
        assert_eq!(clean("a坏b", 4), "a坏");
        let long = "x\n".repeat(LOGGED_ID);
        assert_eq!(LoggedId(&long).to_string(), clean(&long, LOGGED_ID));
    }
}

//! Multi-pattern word matching for policy scripts: one Aho-Corasick automaton per word list,
//! built once, matching case-insensitively on Unicode text (CJK word lists work as is).

use aho_corasick::{AhoCorasick, MatchKind};

/// A compiled word list.
#[derive(Debug, Clone)]
pub struct WordList {
    matcher: AhoCorasick,
    words: Vec<String>,
}

/// Text lowercased char by char, remembering which original char each byte came from.
struct Folded {
    text: String,
    /// For each byte of `text`, the index of the original char it came from.
    origin: Vec<usize>,
}

fn fold(text: &str) -> Folded {
    let mut folded = String::with_capacity(text.len());
    let mut origin = Vec::with_capacity(text.len());
    for (index, c) in text.chars().enumerate() {
        for lower in c.to_lowercase() {
            folded.push(lower);
            origin.extend(std::iter::repeat_n(index, lower.len_utf8()));
        }
    }
    Folded {
        text: folded,
        origin,
    }
}

impl WordList {
    /// Compiles `words` (one per entry; blank entries and `#` comments are skipped).
    ///
    /// # Errors
    /// The automaton could not be built (far beyond any realistic list size).
    pub fn new<I, S>(words: I) -> Result<Self, aho_corasick::BuildError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let words: Vec<String> = words
            .into_iter()
            .map(|w| w.as_ref().trim().to_owned())
            .filter(|w| !w.is_empty() && !w.starts_with('#'))
            .map(|w| fold(&w).text)
            .collect();
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&words)?;
        Ok(Self { matcher, words })
    }

    /// Number of words in the list.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the list has no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The listed words found in `text` (lowercased, in order of appearance).
    pub fn find(&self, text: &str) -> Vec<String> {
        let folded = fold(text);
        self.matcher
            .find_iter(&folded.text)
            .map(|m| self.words[m.pattern().as_usize()].clone())
            .collect()
    }

    /// `text` with every character of every listed word replaced by `mask`, and how many
    /// words were masked.
    pub fn mask(&self, text: &str, mask: char) -> (String, usize) {
        let folded = fold(text);
        let mut hidden = vec![false; text.chars().count()];
        let mut count = 0;
        for m in self.matcher.find_iter(&folded.text) {
            count += 1;
            for &index in &folded.origin[m.start()..m.end()] {
                hidden[index] = true;
            }
        }
        if count == 0 {
            return (text.to_owned(), 0);
        }
        let masked = text
            .chars()
            .zip(hidden)
            .map(|(c, hide)| if hide { mask } else { c })
            .collect();
        (masked, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_case_insensitively_and_masks_per_character() {
        let list = WordList::new(["Darn", "heck", "# comment", ""]).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.find("Oh DARN it, heck"), vec!["darn", "heck"]);
        assert_eq!(list.mask("Oh DARN it", '*'), ("Oh **** it".to_string(), 1));
        assert_eq!(list.mask("clean", '*'), ("clean".to_string(), 0));
    }

    #[test]
    fn chinese_and_length_changing_case_folds() {
        let list = WordList::new(["坏蛋", "straße"]).unwrap();
        assert_eq!(list.mask("你是坏蛋吗", '*'), ("你是**吗".to_string(), 1));
        // 'İ' lowercases to two chars; masking still lines up with the original text.
        assert_eq!(
            list.mask("İ STRASSE Straße", '#'),
            ("İ STRASSE ######".to_string(), 1)
        );
    }

    #[test]
    fn longest_match_wins() {
        let list = WordList::new(["bad", "badword"]).unwrap();
        assert_eq!(list.find("a badword here"), vec!["badword"]);
    }
}
